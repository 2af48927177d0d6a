"""Build the documentation site (MkDocs + Material) into ``build/site``, offline.

    python docs/build_site.py [--lecture build/lecture] [--work build/docs] [--out build/site]

Every page is generated from a source of truth, never copied by hand:

* the home page is ``README.md``, the architecture page ``docs/architecture.md`` and the benchmarks page
  ``BENCHMARKS.md``;
* one page per command of ``prefalign.cli.COMMANDS``: its sub-commands and options come from the argument
  parser the CLI builds, and each option's type, default and meaning from the config dataclass behind it
  (``dataclasses.fields`` and ``prefalign.config.field_docs``). A command whose module has no config
  dataclass gets its ``--help`` text instead;
* the API reference is rendered from the docstrings by mkdocstrings, one page per module;
* the lecture pages are the executed notebooks written by ``docs/run_lecture.py`` (``make lecture``); a
  chapter without an executed copy is shown without outputs, with a note saying so.

Settings shared by every build (theme, plugins, Markdown extensions) live in ``mkdocs.yml``; this script
supplies the pages, the navigation and the folders. Needs the ``docs`` extra.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import shutil
import sys
import typing
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from run_lecture import chapters  # noqa: E402

# --------------------------------------------------------------------------------------------------
# command pages


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _config_classes() -> list[type]:
    """Every ``*Config`` dataclass defined in a loaded ``prefalign`` module."""
    found: dict[str, type] = {}
    for name, module in list(sys.modules.items()):
        if not name.startswith("prefalign") or module is None:
            continue
        for obj in vars(module).values():
            if (
                isinstance(obj, type)
                and dataclasses.is_dataclass(obj)
                and obj.__name__.endswith("Config")
                and obj.__module__.startswith("prefalign")
            ):
                found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return list(found.values())


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {a.dest for a in parser._actions if a.option_strings and a.dest not in ("help", "config")}


def _match_config(parser: argparse.ArgumentParser, classes: list[type]) -> type | None:
    """The config dataclass the parser's options come from (``--config`` aside): the one it names, else the
    one whose fields are exactly its options."""
    named = parser.get_default("config_class")
    if named is not None:
        return named
    options = _options(parser)
    if not options:
        return None
    for cls in classes:
        if {f.name for f in dataclasses.fields(cls)} == options:
            return cls
    return None


def _type_name(tp: Any) -> str:
    if isinstance(tp, type) and typing.get_origin(tp) is None:
        return tp.__name__
    return str(tp).replace("typing.", "").replace("NoneType", "None")


def _default(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = field.default_factory()  # type: ignore[misc]
    else:
        return "**required**"
    if isinstance(value, list):
        return "`" + (",".join(str(v) for v in value) or "(empty)") + "`"
    return f"`{value!r}`" if isinstance(value, str) else f"`{value}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def options_table(cls: type) -> str:
    """A Markdown table of ``cls``'s fields: flag, type, default, and the docstring under each field."""
    from prefalign.config import field_docs

    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    lines = ["| option | type | default | meaning |", "| --- | --- | --- | --- |"]
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        if hints[f.name] is bool:
            flag += f" / --no-{f.name.replace('_', '-')}"
        lines.append(
            # a pipe inside a code span does not split the cell; elsewhere it must be escaped
            f"| `{flag}` | `{_type_name(hints[f.name])}` | {_default(f)} | {_cell(docs.get(f.name, ''))} |"
        )
    return "\n".join(lines)


def _leaves(prog: str, parser: argparse.ArgumentParser) -> list[tuple[str, argparse.ArgumentParser]]:
    subs = _subparsers(parser)
    if not subs:
        return [(prog, parser)]
    return [leaf for name, sub in subs.items() for leaf in _leaves(f"{prog} {name}", sub)]


def command_page(name: str) -> str:
    """The Markdown page of ``prefalign <name>``, generated from its parser and config dataclasses."""
    from prefalign.cli import COMMANDS, build_parser

    module = COMMANDS[name]()
    top = _subparsers(build_parser(name))[name]
    classes = _config_classes()
    out = [f"# prefalign {name}", ""]
    if top.description:
        out += [top.description, ""]
    leaves = [
        (prog, parser, _match_config(parser, classes)) for prog, parser in _leaves(f"prefalign {name}", top)
    ]
    note = f"Generated from `{module.__name__}`."
    if any(cls is not None for _, _, cls in leaves):
        note += (
            " Options that come from a config dataclass can also be set in a YAML file passed as"
            " `--config FILE.yaml`, whose keys are the option names (flags win; unknown keys are an error)."
        )
    out += [note, ""]
    for prog, parser, cls in leaves:
        if prog != f"prefalign {name}":
            out += [f"## `{prog}`", ""]
            if parser.description:
                out += [parser.description, ""]
        if cls is not None:
            out += [f"Options (from `{cls.__module__}.{cls.__qualname__}`):", "", options_table(cls), ""]
            if any("--num-processes" in a.option_strings for a in parser._actions):
                out += [
                    "Running on several processes: `--num-processes N` relaunches the command under "
                    "`torchrun` (N processes on one machine); `--launch-config FILE` relaunches it under "
                    "`accelerate launch` with an Accelerate config (`configs/accelerate/`: DDP, FSDP, "
                    'DeepSpeed ZeRO-2/3). See the README\'s "Running at scale".',
                    "",
                ]
        else:
            out += ["```text", parser.format_help().rstrip(), "```", ""]
    return "\n".join(out)


# --------------------------------------------------------------------------------------------------
# the other pages


def api_modules() -> list[str]:
    """Public modules of the package (``prefalign.testing`` and ``__main__`` left out)."""
    src = ROOT / "src"
    names = []
    for path in sorted((src / "prefalign").rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts[-1] in ("__main__", "testing") or any(p.startswith("_") for p in parts):
            continue
        names.append(".".join(parts))
    return names


def _rewrite_links(text: str) -> str:
    """Repository-relative links in README/BENCHMARKS -> their pages on the site (or GitHub-free text)."""
    text = re.sub(r"\]\(BENCHMARKS\.md\)", "](benchmarks.md)", text)
    text = re.sub(r"\]\(docs/lecture/?\)", "](lecture/index.md)", text)
    text = re.sub(r"\]\(docs/architecture\.md\)", "](architecture.md)", text)
    return text


def _chapter_title(path: Path) -> str:
    for line in path.read_text().splitlines():
        if line.startswith("# # "):
            return line[4:].strip()
    return path.stem


def lecture_pages(work: Path, lecture_dir: Path) -> list[dict[str, str]]:
    """Copy executed notebooks (or unexecuted conversions) into ``work/lecture``; returns nav entries."""
    import jupytext
    import nbformat

    target = work / "lecture"
    target.mkdir(parents=True, exist_ok=True)
    nav = [{"About the lecture": "lecture/index.md"}]
    rows = []
    for chapter in chapters():
        executed = lecture_dir / f"{chapter.stem}.ipynb"
        if executed.exists():
            shutil.copy(executed, target / executed.name)
        else:
            nb = jupytext.read(chapter)
            note = (
                "*This chapter was not executed for this build of the site, so its outputs and figures are "
                "missing: run `make lecture` (or `python docs/run_lecture.py`) and rebuild.*"
            )
            nb.cells.insert(1, nbformat.v4.new_markdown_cell(note))
            nbformat.write(nb, target / f"{chapter.stem}.ipynb")
        title = _chapter_title(chapter)
        nav.append({title: f"lecture/{chapter.stem}.ipynb"})
        rows.append(
            f"| [{title}]({chapter.stem}.ipynb) | `docs/lecture/{chapter.name}` | {'yes' if executed.exists() else 'no'} |"
        )
    index = (ROOT / "docs" / "lecture_index.md").read_text()
    index += "\n| chapter | source | executed in this build |\n| --- | --- | --- |\n" + "\n".join(rows) + "\n"
    (target / "index.md").write_text(index)
    return nav


def copy_mathjax(work: Path) -> None:
    """MathJax 2 (from the ``jupyter-server-mathjax`` package) into the site, so that the lecture's formulas
    render offline; ``mkdocs.yml`` points mkdocs-jupyter's ``custom_mathjax_url`` at it."""
    import jupyter_server_mathjax

    static = Path(jupyter_server_mathjax.__file__).parent / "static"
    target = work / "assets" / "mathjax"
    shutil.copytree(static, target)
    (target / "config" / "local").mkdir(parents=True, exist_ok=True)
    (target / "config" / "local" / "prefalign.js").write_text(MATHJAX_CONFIG)


# The combined TeX config carries the HTML-CSS output; with web fonts off it typesets with the fonts the
# reader has, so it also works from file:// URLs (where browsers refuse to load web fonts).
MATHJAX_CONFIG = """MathJax.Hub.Config({
  "HTML-CSS": {availableFonts: [], preferredFont: null, webFont: null, imageFont: null}
});
MathJax.Ajax.loadComplete("[MathJax]/config/local/prefalign.js");
"""


def generate(work: Path, lecture_dir: Path) -> list[Any]:
    """Write every page under ``work``; returns the navigation."""
    from prefalign.cli import COMMANDS

    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    copy_mathjax(work)
    (work / "index.md").write_text(_rewrite_links((ROOT / "README.md").read_text()))
    (work / "benchmarks.md").write_text(_rewrite_links((ROOT / "BENCHMARKS.md").read_text()))
    (work / "architecture.md").write_text((ROOT / "docs" / "architecture.md").read_text())
    (work / "commands").mkdir()
    command_nav = []
    for name in COMMANDS:
        (work / "commands" / f"{name}.md").write_text(command_page(name))
        command_nav.append({f"prefalign {name}": f"commands/{name}.md"})
    (work / "api").mkdir()
    api_nav = []
    for module in api_modules():
        (work / "api" / f"{module}.md").write_text(f"# `{module}`\n\n::: {module}\n")
        api_nav.append({module: f"api/{module}.md"})
    return [
        {"Home": "index.md"},
        {"Architecture": "architecture.md"},
        {"Lecture": lecture_pages(work, lecture_dir)},
        {"Commands": command_nav},
        {"Python API": api_nav},
        {"Benchmarks": "benchmarks.md"},
    ]


def build(work: Path, out: Path, lecture_dir: Path) -> None:
    from mkdocs.commands.build import build as mkdocs_build
    from mkdocs.config import load_config

    nav = generate(work, lecture_dir)
    config = load_config(str(ROOT / "mkdocs.yml"), docs_dir=str(work), site_dir=str(out), nav=nav)
    mkdocs_build(config)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--lecture", default=str(ROOT / "build" / "lecture"), help="executed notebooks (make lecture)"
    )
    parser.add_argument("--work", default=str(ROOT / "build" / "docs"), help="folder for the generated pages")
    parser.add_argument("--out", default=str(ROOT / "build" / "site"), help="folder for the built site")
    args = parser.parse_args(argv)
    build(Path(args.work), Path(args.out), Path(args.lecture))
    print(f"site written to {args.out} (open {Path(args.out) / 'index.html'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
