"""The example site's own tests: `manage.py test blog`. The project's end-to-end suite runs
them against PostgreSQL through Strata's pooler."""

from django.contrib.auth.models import User
from django.db import connection, transaction
from django.test import TestCase, TransactionTestCase

from .models import Article, Comment


class PagesTests(TestCase):
    @classmethod
    def setUpTestData(cls):
        cls.article = Article.objects.create(title="Pooled", body="Through the pooler.")

    def test_front_page_lists_articles_with_surrogate_keys(self):
        response = self.client.get("/")
        self.assertContains(response, "Pooled")
        self.assertIn(f"article-{self.article.pk}", response["Surrogate-Key"])

    def test_comment_form_needs_its_csrf_token_and_saves(self):
        strict = self.client_class(enforce_csrf_checks=True)
        refused = strict.post(f"/articles/{self.article.pk}/", {"author": "a", "text": "t"})
        self.assertEqual(refused.status_code, 403)
        page = strict.get(f"/articles/{self.article.pk}/")
        token = page.cookies["csrftoken"].value
        saved = strict.post(f"/articles/{self.article.pk}/",
                            {"author": "ann", "text": "hello", "csrfmiddlewaretoken": token})
        self.assertEqual(saved.status_code, 302)
        self.assertEqual(self.article.comments.get().author, "ann")

    def test_personal_page_needs_a_login(self):
        self.assertEqual(self.client.get("/me/").status_code, 302)
        User.objects.create_user("bob", password="pw-bob-123")
        self.client.login(username="bob", password="pw-bob-123")
        self.assertContains(self.client.get("/me/"), "bob")

    def test_a_missing_article_is_404(self):
        self.assertEqual(self.client.get("/articles/999999/").status_code, 404)


class TransactionTests(TransactionTestCase):
    def test_a_failed_transaction_leaves_nothing_and_the_connection_works(self):
        article = Article.objects.create(title="t", body="b")
        with self.assertRaises(RuntimeError):
            with transaction.atomic():
                Comment.objects.create(article=article, author="x", text="y")
                raise RuntimeError("rolled back")
        self.assertEqual(Comment.objects.count(), 0)
        with connection.cursor() as cursor:
            cursor.execute("select 1")
            self.assertEqual(cursor.fetchone(), (1,))

    def test_iterating_a_large_queryset(self):
        Article.objects.bulk_create(Article(title=f"a{i}", body="b") for i in range(500))
        total = Article.objects.count()
        self.assertGreaterEqual(total, 500)
        self.assertEqual(sum(1 for _ in Article.objects.iterator(chunk_size=50)), total)
