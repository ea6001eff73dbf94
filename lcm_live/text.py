"""Text that leaves the server: what came from a user or a file is shown as text, and no server path is shown.

Gradio renders Markdown components and the messages of gr.Error and gr.Warning as HTML (sanitised, but forms,
password inputs, links and images survive), so every dynamic string goes through `markdown_text` or `toast_text`.
Server-side messages (errors from images, the model, the loader) also go through `public_text` first.
"""

from __future__ import annotations

import html
import re


_MARKDOWN = re.compile(r"([\\`*_{}\[\]()#+\-.!|~>:@])")  # ":" and "@" too: no autolinked URL or e-mail
# An absolute path (POSIX, home-relative or Windows) not inside a URL or a word: /root/x, ~/x, C:\x, 'file:///x'.
_PATH = re.compile(r"(?<![\w:/.\-~])(?:~|[A-Za-z]:)?[/\\](?:[^\s/\\'\"`<>|:,;()]+[/\\]?)+")
HIDDEN = "<path>"


def markdown_text(text: str) -> str:
    """`text` shown inside Markdown as itself: no HTML, no links, images or emphasis."""
    return _MARKDOWN.sub(r"\\\1", html.escape(str(text), quote=False))


def toast_text(text: str) -> str:
    """gr.Error and gr.Warning render their message as HTML: text in it must be escaped."""
    return html.escape(str(text), quote=False)


def public_text(text: str) -> str:
    """A server-side message without the filesystem paths it may name."""
    return _PATH.sub(lambda found: HIDDEN + found.group(0)[len(found.group(0).rstrip(".")):], str(text))


def display_name(reference: str | None) -> str | None:
    """A model reference as the page shows it: a hub id or relative path as written, an absolute path by its last
    two parts. Decided from the text alone, never from the filesystem, so that the name does not tell what exists.
    """
    if reference is None:
        return None
    text = str(reference).strip().rstrip("/\\")
    parts = [part for part in re.split(r"[/\\]+", text) if part not in ("", ".")]
    if not re.match(r"([/\\~]|[A-Za-z]:)", text) and ".." not in parts:
        return text  # owner/name, owner/repo/file.safetensors, models/mine: as the operator wrote it
    parts = [part for part in parts if part not in ("..", "~") and not re.fullmatch(r"[A-Za-z]:", part)]
    return "/".join(parts[-2:]) or "a local model"
