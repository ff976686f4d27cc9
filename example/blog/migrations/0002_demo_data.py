"""Demo content: twenty articles and a user `demo` with password `demo`."""

from django.contrib.auth.hashers import make_password
from django.db import migrations


def create(apps, schema_editor):
    Article = apps.get_model("blog", "Article")
    User = apps.get_model("auth", "User")
    for i in range(1, 21):
        Article.objects.create(
            title=f"Article {i}",
            body=f"The body of article {i}. " * 20,
        )
    User.objects.create(username="demo", password=make_password("demo"), is_staff=True, is_superuser=True)


class Migration(migrations.Migration):
    dependencies = [("blog", "0001_initial"), ("auth", "0012_alter_user_first_name_max_length")]
    operations = [migrations.RunPython(create, migrations.RunPython.noop)]
