"""Views of the example site, one per kind of traffic a Django site serves."""

import hashlib
import time

from django.conf import settings
from django.core.cache import caches
from django.contrib.auth.decorators import login_required
from django.http import FileResponse, Http404, HttpResponse, StreamingHttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.cache import cache_control

from .forms import CommentForm, UploadForm
from .models import Article


@cache_control(public=True, max_age=60)
def index(request):
    """Anonymous and cacheable: the same page for everyone. Its surrogate keys let a change
    to any article purge it (signals.py)."""
    articles = Article.objects.all()[:20]
    response = render(request, "blog/index.html", {"articles": articles})
    response["Surrogate-Key"] = " ".join(["articles", *(f"article-{a.pk}" for a in articles)])
    return response


def article(request, pk):
    """A page with a form protected by CSRF."""
    article = get_object_or_404(Article, pk=pk)
    form = CommentForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        comment = form.save(commit=False)
        comment.article = article
        comment.save()
        return redirect("article", pk=pk)
    return render(request, "blog/article.html", {"article": article, "form": form})


@login_required
def me(request):
    """Personal: only for a logged-in user."""
    return render(request, "blog/me.html")


def visits(request):
    """Counts visits in the node's cache tier: memcached commands from the worker."""
    cache = caches["node"]
    cache.add("visits", 0, timeout=None)
    count = cache.incr("visits")
    cache.set(f"visit:{count % 100}", request.META.get("REMOTE_ADDR", ""), timeout=60)
    return HttpResponse(f"{count}\n", content_type="text/plain")


def slow(request):
    """Takes `seconds` (default 1, at most 60) to answer."""
    seconds = min(float(request.GET.get("seconds", "1")), 60.0)
    time.sleep(seconds)
    return render(request, "blog/message.html", {"message": f"slept {seconds:g}s"})


def boom(request):
    """A broken view."""
    raise RuntimeError("boom: this view always fails")


def stream(request):
    """A response produced piece by piece."""
    count = min(int(request.GET.get("count", "5")), 1000)
    delay = min(float(request.GET.get("delay", "0.1")), 5.0)

    def lines():
        for i in range(count):
            yield f"line {i}\n"
            time.sleep(delay)

    return StreamingHttpResponse(lines(), content_type="text/plain")


def upload(request):
    """Accepts a file and reports its size and SHA-256."""
    form = UploadForm(request.POST or None, request.FILES or None)
    result = None
    if request.method == "POST" and form.is_valid():
        digest = hashlib.sha256()
        size = 0
        for chunk in form.cleaned_data["file"].chunks():
            digest.update(chunk)
            size += len(chunk)
        result = {"name": form.cleaned_data["file"].name, "size": size, "sha256": digest.hexdigest()}
    return render(request, "blog/upload.html", {"form": form, "result": result})


def download(request, name):
    """A file sent through wsgi.file_wrapper."""
    path = (settings.DOWNLOADS_DIR / name).resolve()
    if path.parent != settings.DOWNLOADS_DIR.resolve() or not path.is_file():
        raise Http404("no such file")
    return FileResponse(open(path, "rb"), as_attachment=True)
