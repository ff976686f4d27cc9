"""Settings of the example site Strata serves with `make run` and tests against.

Environment variables a test or an operator may set:
  EXAMPLE_DB       path of the SQLite database (default: db.sqlite3 next to manage.py)
  EXAMPLE_PG_PORT  use PostgreSQL instead, on 127.0.0.1 at this port (Strata's pooler, as
                   `make run` sets it up); EXAMPLE_PG_HOST, EXAMPLE_PG_NAME (default
                   "example"), EXAMPLE_PG_USER (default "postgres"), EXAMPLE_PG_PASSWORD
  EXAMPLE_DEBUG    "1" for Django's debug mode
  EXAMPLE_DOWNLOADS  directory /download/<name> serves files from
  EXAMPLE_MANIFEST_STATIC  "1" once `collectstatic` has run: hashed static names (make run)
"""

import os
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent

SECRET_KEY = os.environ.get("EXAMPLE_SECRET_KEY", "example-only-not-a-secret")
DEBUG = os.environ.get("EXAMPLE_DEBUG") == "1"
ALLOWED_HOSTS = ["localhost", "127.0.0.1", "[::1]", "testserver"]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "blog",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "mysite.urls"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

WSGI_APPLICATION = "mysite.wsgi.application"

# "default" stays in the process; "node" is the node's cache tier, reached over the worker's
# own connection to the master (outside a Strata worker it warns and stores nothing).
CACHES = {
    "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
    "node": {"BACKEND": "strata.django.StrataCache"},
}

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ.get("EXAMPLE_DB", str(BASE_DIR / "db.sqlite3")),
    }
}
if os.environ.get("EXAMPLE_PG_PORT"):
    # Through Strata's pooler in transaction mode: connections to the pooler are cheap to
    # keep, and server-side cursors cannot outlive the transaction that lends a server
    # connection, so Django must not use them.
    DATABASES["default"] = {
        "ENGINE": "django.db.backends.postgresql",
        "HOST": os.environ.get("EXAMPLE_PG_HOST", "127.0.0.1"),
        "PORT": os.environ["EXAMPLE_PG_PORT"],
        "NAME": os.environ.get("EXAMPLE_PG_NAME", "example"),
        "USER": os.environ.get("EXAMPLE_PG_USER", "postgres"),
        "PASSWORD": os.environ.get("EXAMPLE_PG_PASSWORD", ""),
        "CONN_MAX_AGE": 60,
        "CONN_HEALTH_CHECKS": True,
        "DISABLE_SERVER_SIDE_CURSORS": True,
    }

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = BASE_DIR / "staticfiles"
if os.environ.get("EXAMPLE_MANIFEST_STATIC") == "1":
    # After `collectstatic` (make run runs it): pages link content-hashed names, which
    # Strata's load balancer serves from STATIC_ROOT as immutable files, without Python.
    STORAGES = {
        "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
        "staticfiles": {
            "BACKEND": "django.contrib.staticfiles.storage.ManifestStaticFilesStorage"
        },
    }
DOWNLOADS_DIR = Path(os.environ.get("EXAMPLE_DOWNLOADS", str(BASE_DIR / "files")))

LOGIN_URL = "/accounts/login/"
LOGIN_REDIRECT_URL = "/me/"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"django.request": {"handlers": ["console"], "level": "ERROR"}},
}
