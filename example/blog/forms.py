from django import forms

from .models import Comment


class CommentForm(forms.ModelForm):
    class Meta:
        model = Comment
        fields = ["author", "text"]


class UploadForm(forms.Form):
    file = forms.FileField()
