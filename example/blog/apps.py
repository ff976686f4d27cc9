"""The blog application."""

from django.apps import AppConfig


class BlogConfig(AppConfig):
    name = "blog"

    def ready(self):
        from . import signals  # noqa: F401  (connects the cache invalidation handlers)
