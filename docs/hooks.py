"""MkDocs hook: the configuration reference page is generated from the config dataclasses at
build time (``hvpmtl.config_reference.markdown``), so it can never disagree with the code."""

from __future__ import annotations

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
