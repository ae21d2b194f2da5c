"""MkDocs hook: the configuration reference page is generated from the config dataclasses at
build time (``hvpmtl.config_reference.markdown``), so it can never disagree with the code."""

from __future__ import annotations

import re

from mkdocs.structure.files import File

PAGE = "config-reference.md"
INTRO = (
    "Every key of a pre-training config, with its type, default and one-line help, generated from "
    "the dataclasses. `hvpmtl config --explain KEY` prints the same for one key or block "
    "(`hvpmtl config --explain tasks.mlc`); `hvpmtl config -c PRESET [key=value ...]` prints a resolved config."
)


def on_files(files, config):
    from hvpmtl.config_reference import markdown

    files.append(File.generated(config, PAGE, content=markdown(intro=INTRO)))
    return files


# Sphinx roles in docstrings (:func:`x`) reach the page as ":func:<code>x</code>": drop the role,
# and link the name to its entry when the page documents it (by full path or a unique suffix).
ROLE = re.compile(r":(?:func|meth|class|mod|attr|data|obj):<code>(~?)([\w.]+)</code>")


def on_page_content(html, page, config, files):
    ids = set(re.findall(r'id="(hvpmtl[\w.]*)"', html))

    def link(m):
        name = m.group(2)
        shown = name.rsplit(".", 1)[-1] if m.group(1) else name
        found = [name] if name in ids else [i for i in ids if i.endswith("." + name)]
        code = f"<code>{shown}</code>"
        return f'<a href="#{found[0]}">{code}</a>' if len(found) == 1 else code

    return ROLE.sub(link, html)
