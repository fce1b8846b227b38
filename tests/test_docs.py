"""The README's capture-point table is the core's table, with the aliases the code accepts; its table
of errors is the exception hierarchy."""
from __future__ import annotations

import inspect
import re

from conftest import REPO
from tokentrail.capture import POINTS, TL_ALIASES


def readme_rows() -> list[tuple[list[str], bool, str, set[str]]]:
    text = (REPO / "README.md").read_text()
    section = text.split("### Capture points and interventions", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 4 or not cells[0].startswith("`"):
            continue
        aliases, prefix = set(), ""
        for a in re.findall(r"`([^`]+)`", cells[3]):
            if "." not in a and prefix:  # "blocks.L.attn.hook_q / hook_k" shorthand shares the prefix
                a = f"{prefix}.{a}"
            prefix = a.rsplit(".", 1)[0] if "." in a else ""
            aliases.add(a)
        rows.append((re.findall(r"`([^`]+)`", cells[0]), cells[1] == "yes", cells[2].strip("`"), aliases))
    return rows


def test_readme_lists_every_point_with_its_shape():
    rows = readme_rows()
    assert sorted(n for names, *_ in rows for n in names) == sorted(POINTS)
    for names, per_layer, shape, _ in rows:
        for name in names:
            assert POINTS[name].per_layer == per_layer, name
            assert POINTS[name].shape.replace("n_kv_heads", "heads").replace("n_heads", "heads") == shape, name


def test_readme_aliases_are_the_codes():
    for names, _, _, documented in readme_rows():
        in_code = {a.replace("{l}", "L") for a, short in TL_ALIASES.items() if short in names}
        assert documented == in_code, names


def test_readme_lists_every_error_class():
    """Every exception class of tokentrail.errors has a row in the README's Errors table, with its built-in base."""
    import tokentrail.errors as errors

    section = (REPO / "README.md").read_text().split("### Errors", 1)[1].split("\n### ", 1)[0]
    rows = {re.findall(r"`(\w+)`", line)[0]: line for line in section.splitlines()
            if line.startswith("| `")}
    classes = {name: cls for name, cls in vars(errors).items() if inspect.isclass(cls)
               and issubclass(cls, errors.TokentrailError) and cls is not errors.TokentrailError}
    assert set(rows) == set(classes)
    for name, cls in classes.items():
        builtins = [b.__name__ for b in cls.__mro__
                    if b.__module__ == "builtins" and b not in (Exception, BaseException, object)]
        documented = re.findall(r"`(\w+)`", rows[name].rsplit("|", 2)[-2])
        assert documented and set(documented) <= set(builtins), (name, documented, builtins)
