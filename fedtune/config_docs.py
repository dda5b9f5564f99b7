"""``docs/configuration.md``, generated from the declarations (``python -m fedtune.config_docs``).

Every key of the run config, the train request and the site policy is declared once, with its default,
rule and help (:mod:`common.declare`); this page is derived from those declarations and a test keeps it
equal to them.
"""

from __future__ import annotations

import sys

from client.policy import SECTIONS
from common.config import (
    AggregationConfig,
    LoraConfig,
    NodeConfig,
    RunConfig,
    SecAggConfig,
    SiteDPConfig,
    TrainConfig,
)
from common.declare import markdown_table

INTRO = """# Configuration reference

Generated from the declarations by `python -m fedtune.config_docs` (`tests/common/test_config.py` fails
when this page and the code disagree). Every key is declared once, in `common/config.py` (run config and
train request), `client/policy.py` and `privacy/budget.py` (site policy): the parser, the defaults in
`pyproject.toml`, the policy template that `fedtune simulate` and `fedtune deploy provision` write, and
these tables all come from that one declaration.
"""

RUN_SECTIONS: tuple[tuple[str, type, str], ...] = (
    ("Run", RunConfig, "the run as a whole (keys of the sections below are listed there)"),
    ("LoRA", LoraConfig, "the adapter every party shares; also sent to every site in each train request"),
    (
        "Training",
        TrainConfig,
        "what each site is asked to do per round; every site's policy has the last word",
    ),
    ("Aggregation", AggregationConfig, "choosing sites, checking and combining their updates"),
    ("Site-level DP", SiteDPConfig, "optional DP over whole sites, at the coordinator"),
    ("SecAgg+", SecAggConfig, "optional secure aggregation"),
)


def render() -> str:
    """The whole page."""
    parts = [INTRO, "## Run config (`--run-config`, `[tool.flwr.app.config]`)\n"]
    for title, cls, what in RUN_SECTIONS:
        table = markdown_table(cls)
        if cls is RunConfig:  # only its own keys: the sections follow
            own = [
                row
                for row in table.splitlines()
                if not any(row.startswith(f"| `{k}`") for k in _section_keys())
            ]
            table = "\n".join(own) + "\n"
        parts.append(f"### {title}\n\n{what[0].upper()}{what[1:]}.\n\n{table}")
    parts.append(
        "A train request (what a site receives each round) carries the LoRA and Training keys above, plus "
        "`server-round`, `num-rounds`, `run-id`, `base-model-fingerprint`, and `ledger-seq` / `ledger-hash` "
        "(the last entry of the site's ledger the coordinator saw).\n"
    )
    parts.append(
        "## Node config (`flower-supernode --node-config \"policy='...' worker='...'\"`)\n\n"
        f"{markdown_table(NodeConfig)}"
    )
    parts.append("## Site policy (TOML; relative paths resolve against the policy file)\n")
    for name, cls in SECTIONS.items():
        parts.append(f"### `[{name}]`\n\n{(cls.__doc__ or '').strip()}\n\n{markdown_table(cls)}")
    return "\n".join(parts)


def _section_keys() -> set[str]:
    from common.declare import specs

    return {
        s.key
        for cls in (LoraConfig, TrainConfig, AggregationConfig, SiteDPConfig, SecAggConfig)
        for s in specs(cls)
    }


if __name__ == "__main__":
    sys.stdout.write(render())
