"""MkDocs hook: publishes files from outside docs/ that included snippets link to.

A page that includes a file with `--8<--` (benchmarks.md includes
benchmarks/RESULTS.md) keeps that file's relative links, which then resolve
against the page. `extra.included_files` in mkdocs.yml maps each such link
target, as a path in the site, to the repository file it stands for.
"""

from __future__ import annotations

import os

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File


def on_files(files, config):
    root = os.path.dirname(config.config_file_path)
    for site_path, repo_path in config.extra.get("included_files", {}).items():
        source = os.path.join(root, repo_path)
        if not os.path.isfile(source):
            raise PluginError(f"extra.included_files: {repo_path} does not exist")
        files.append(File.generated(config, site_path, abs_src_path=source))
    return files
