"""Print the README's option table from hammal.config (run: python tools/options_table.py)."""

from __future__ import annotations

import textwrap

from hammal.config import FLAGS, LISTS, PARAMETERS

HEADER = ("Option", "Default", "Meaning", "Environment")


def rows() -> list[tuple[str, str, str, str]]:
    table = []
    for spec in PARAMETERS:
        env = ", ".join([spec.env, *spec.extra_env])
        default = f"``{spec.default}``" if spec.default else ""
        table.append((f"``--{spec.name}``", default, spec.help, env))
    for spec in LISTS:
        table.append((f"``--{spec.name}``", "", spec.help, spec.env))
    for name, text in FLAGS:
        table.append((f"``--{name}``", "off", text, "HAMMAL_" + name.upper().replace("-", "_")))
    return table


def main() -> None:
    table = rows()
    widths = [max(len(r[i]) for r in [HEADER, *table]) for i in range(4)]
    widths[2] = min(widths[2], 60)

    def lines(cells: tuple[str, str, str, str]) -> list[str]:
        wrapped = [
            textwrap.wrap(c, widths[i]) or [""] if i == 2 else [c] for i, c in enumerate(cells)
        ]
        height = max(len(w) for w in wrapped)
        return [
            "  ".join(
                (w[k] if k < len(w) else "").ljust(widths[i]) for i, w in enumerate(wrapped)
            ).rstrip()
            for k in range(height)
        ]

    rule = "  ".join("=" * w for w in widths)
    out = [rule, *lines(HEADER), rule]
    for row in table:
        out += lines(row)
    out.append(rule)
    print("\n".join(out))


if __name__ == "__main__":
    main()
