"""Cache invalidation: when an article or a comment changes, the cached pages that show it are
purged from Strata's accelerator once the transaction commits, in-process (no HTTP request,
no ACL). The pages name what they show in their `Surrogate-Key` header (see views.py)."""

from django.db import transaction
from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver

import strata

from .models import Article, Comment


@receiver([post_save, post_delete], sender=Article)
def article_changed(sender, instance, **kwargs):
    transaction.on_commit(lambda: strata.purge_tags("articles", f"article-{instance.pk}"))


@receiver([post_save, post_delete], sender=Comment)
def comment_changed(sender, instance, **kwargs):
    transaction.on_commit(lambda: strata.purge_tags(f"article-{instance.article_id}"))
