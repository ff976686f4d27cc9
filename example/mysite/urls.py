"""URL configuration of the example site."""

from django.conf import settings
from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import path, re_path
from django.views.static import serve

from blog import views

urlpatterns = [
    path("", views.index, name="index"),
    path("articles/<int:pk>/", views.article, name="article"),
    path("me/", views.me, name="me"),
    path("accounts/login/", auth_views.LoginView.as_view(), name="login"),
    path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("slow/", views.slow, name="slow"),
    path("visits/", views.visits, name="visits"),
    path("boom/", views.boom, name="boom"),
    path("stream/", views.stream, name="stream"),
    path("upload/", views.upload, name="upload"),
    path("download/<str:name>", views.download, name="download"),
    path("admin/", admin.site.urls),
    # Static files through Django until the load balancer tier serves them itself.
    re_path(r"^static/(?P<path>.*)$", serve, {"document_root": settings.STATICFILES_DIRS[0]}),
]
