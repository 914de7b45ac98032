"""Every default, allowed value and preset shape the docs state is the code's.

The docs' prose (README.md, docs/*.md, BENCHMARKS.md, examples/README.md; code blocks and
docs/flags.md's generated table left out, tests/test_readme.py holds that one) is scanned for
statements about a flag, in the shapes the docs use:

- a default: "`--flag` defaults to V", "`--flag`, default V", "`--flag` (default: V)",
  "`--flag V` (the default)", "`--flag` V" (a bare number after a flag: "`--hysteresis` 2"),
  "`--a` and `--b` default to X and Y", and a value marked "`V` (default)" after the flag it is a
  value of (in its sentence, list or table header);
- allowed values: "`--flag a|b|c`" and "`--flag` is one of a, b, c" (all of them, exactly), and
  the values a table headed by the flag, or a list a sentence naming the flag introduces, or a
  list in a flag's table row, names (each one allowed);
- a preset's shape: "`tiny` = Llama family, 4 layers, hidden 128, ..." and the comment of a
  `--model PRESET` command ("# 4 layers, 8 experts, top-2").

Each is checked against the parser that owns the flag: pretrain_gpt.py's (its defaults are the
config dataclasses' fields, a model field's the default preset's), or a tool's, captured as its
main() builds it (the tool whose name the paragraph gives, where several own the flag). A default
the code leaves as None and derives later (the `--save` directory, pp) is not in any parser: those
are listed in DERIVED with where the code derives them, and a new one fails until it is listed."""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import itertools
import re
from functools import cache
from pathlib import Path

import pytest

from megatron_lite.config import ModelConfig, ParallelConfig, TrainConfig
from megatron_lite.planner.parameters import count_parameters
from megatron_lite.training.arguments import DEFAULT_PRESET, PRESETS, build_parser, parse_args

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = ["README.md", *sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md")), "BENCHMARKS.md",
             "examples/README.md"]
PRETRAIN = "pretrain_gpt.py"
# Defaults the code leaves as None and derives where it is used, as the docs state them: the
# parsers cannot report them, so each is listed with where the code derives it.
DERIVED = {
    "--log-dir": ("the `--save` directory", "training/loop.py: `cfg.log_dir or cfg.save`"),
    "--wandb-save-dir": ("`wandb/` in the `--save` directory",
                         "training/metric_writers.py: `cfg.wandb_save_dir or os.path.join(cfg.save, \"wandb\")`"),
    "--microbatch-group-size-per-virtual-pipeline-stage": ("pp", "ParallelConfig.microbatch_group_size"),
    "--recompute-num-layers": ("1", "model/gpt.py: `cfg.recompute_num_layers or 1`"),
    "--recompute-modules": ("`core_attn`", "ModelConfig.selective_recompute"),
    "--pipeline-schedule": ("`1f1b`", "`interleaved`", "ParallelConfig.schedule: interleaved with --vpp, else 1f1b"),
    "--weight-grad-time": ("half the backward", "tools/plot_schedule.py: backward_time / 2"),
}
FLAG = r"--[a-z0-9][a-z0-9-]*"


# -- what the code reports ----------------------------------------------------------------------

class _Built(Exception):
    """Raised in place of parsing: the tool's parser is built, nothing runs."""


@cache
def parsers() -> dict[str, argparse.ArgumentParser]:
    """pretrain_gpt.py's parser and every tool's (a subcommand's as `tool.py sub`), as built."""
    found = {PRETRAIN: build_parser()}
    built: list[argparse.ArgumentParser] = []

    def capture(self: argparse.ArgumentParser, *args: object, **kwargs: object) -> None:
        built.append(self)
        raise _Built

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_known_args", capture)
        for path in sorted((ROOT / "tools").glob("*.py")):
            module = importlib.import_module(f"tools.{path.stem}")
            if not hasattr(module, "main"):
                continue
            built.clear()
            with pytest.raises(_Built):
                module.main(["--help"])
            found[path.name] = built[0]
            for action in built[0]._actions:
                if isinstance(action, argparse._SubParsersAction):
                    found.update({f"{path.name} {name}": sub for name, sub in action.choices.items()})
    return found


@cache
def _field_defaults() -> dict[str, object]:
    """The config dataclasses' defaults by field name, a model field's the default preset's."""
    defaults = {}
    for cls in (ModelConfig, ParallelConfig, TrainConfig):
        for f in dataclasses.fields(cls):
            defaults[f.name] = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    return {**defaults, **PRESETS[DEFAULT_PRESET]}


def owners(flag: str) -> dict[str, argparse.Action]:
    """The parsers that take `flag`, with its action in each."""
    return {name: action for name, parser in parsers().items() for action in parser._actions
            if flag in action.option_strings}


def default_of(action: argparse.Action) -> object:
    """The flag's default: argparse's, or for the config's flags (argparse.SUPPRESS) the field's."""
    if action.default is not argparse.SUPPRESS:
        return action.default
    return _field_defaults().get(action.dest)


# -- what the docs say --------------------------------------------------------------------------

@dataclasses.dataclass
class Statement:
    where: str
    flag: str
    value: str
    context: str  # the paragraph, for the tool it names

    def __str__(self) -> str:
        return f"{self.where}: {self.flag} {self.value!r}"


def _blank(match: re.Match) -> str:
    return re.sub(r"[^\n]", " ", match.group(0))


def prose(path: str) -> str:
    """The document with its code blocks and the generated flags table blanked, offsets and line
    numbers kept (the scans join its lines, so that a statement may wrap)."""
    text = (ROOT / path).read_text()
    text = re.sub(r"^```.*?^```", _blank, text, flags=re.S | re.M)
    text = re.sub(r"<!-- flags -->.*?<!-- /flags -->", _blank, text, flags=re.S)
    return text


def _line(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def _paragraph(text: str, offset: int) -> str:
    start = text.rfind("\n\n", 0, offset)
    end = text.find("\n\n", offset)
    return text[start + 1:end if end >= 0 else None]


def _section(text: str, offset: int) -> int:
    """Where the section holding `offset` starts (its heading)."""
    return max(m.start() for m in re.finditer(r"^#|\A", text[:offset + 1], re.M))


def _cut(value: str) -> str:
    """A stated value ends at the first , ; : ) or ( or at a sentence's end."""
    return re.split(r"[,;:)]|\s\(|\.\s|\.$", value.strip(), maxsplit=1)[0].strip()


DEFAULT_SHAPES = [
    # `--flag V` (the default) / `--flag V`, the default
    rf"`(?P<flag>{FLAG}) (?P<value>[^`]+)`,? \(?the default",
    # `--flag` defaults to V / `--flag`, default V / `... --flag N` ... (default: V): the last flag in the backticks
    rf"`(?:[^`]* )?(?P<flag>{FLAG})(?: [^`]*)?`[^`.|]{{0,50}}?"
    r"(?<![\w-])(?:defaults to|\(default:?|by default:?|default:?)\s+"
    r"(?P<value>[`\w][^|]{0,40})",
    # `--flag` 2^32 (a bare number after a flag)
    rf"`(?P<flag>{FLAG})`\s+(?P<value>\d[\d.^e+-]*)",
]
# `--a` and `--b` default to X and Y
TWO_DEFAULTS = rf"`({FLAG})` and `({FLAG})` defaults? to (\S+) and (\S+?)[,.;]"


def default_statements() -> list[Statement]:
    found = []
    for path in DOCUMENTS:
        text = prose(path)
        joined = text.replace("\n", " ")
        pairs = list(re.finditer(TWO_DEFAULTS, joined))
        for m in pairs:
            for flag, value in ((m[1], m[3]), (m[2], m[4])):
                found.append(Statement(f"{path}:{_line(text, m.start())}", flag, value, _paragraph(text, m.start())))
        for shape in DEFAULT_SHAPES:
            for m in re.finditer(shape, joined):
                if not any(pair.start() <= m.start() < pair.end() for pair in pairs):
                    found.append(Statement(f"{path}:{_line(text, m.start())}", m["flag"], _cut(m["value"]),
                                           _paragraph(text, m.start())))
        # `V` (default) / `V`, the default ...: a value of the nearest flag named before it in the
        # section that allows it (or, where none does, of the nearest flag: then it is refused)
        for m in re.finditer(r"`(?P<value>[^`\s]+)`(?:\s*\(|,) ?(?:the )?default\b", joined):
            if m["value"].startswith("--"):
                continue
            before = re.findall(rf"`({FLAG})[ `]", joined[_section(text, m.start()):m.start()])[::-1]
            assert before, f"{path}:{_line(text, m.start())}: `{m['value']}` (default) of no flag named before it"
            flag = next((f for f in before if any(m["value"] in map(str, a.choices or ())
                                                  for a in owners(f).values())), before[0])
            found.append(Statement(f"{path}:{_line(text, m.start())}", flag, f"`{m['value']}`",
                                   _paragraph(text, m.start())))
    return found


def _literal(value: str) -> object:
    """A stated value as the code would hold it: a number, a list of them, or the text."""
    text = value.strip("`'\" ")
    if re.fullmatch(r"\d+\^\d+", text):
        base, power = text.split("^")
        return float(int(base) ** int(power))
    parts = re.split(r"\s+and\s+|\s+", text)
    try:
        numbers = [float(p) for p in parts]
    except ValueError:
        return text
    return numbers[0] if len(numbers) == 1 else numbers


def _equal(stated: object, default: object) -> bool:
    if isinstance(default, bool) or default is None:
        return False
    if isinstance(default, (int, float)):
        return isinstance(stated, float) and stated == float(default)
    if isinstance(default, list):
        as_list = stated if isinstance(stated, list) else [stated]
        return [str(x) for x in as_list] == [str(x) for x in default] or [
            float(x) if isinstance(x, float) else x for x in as_list] == [
            float(x) if isinstance(x, (int, float)) else x for x in default]
    return stated == default


def _candidates(statement: Statement) -> dict[str, argparse.Action]:
    """The parsers the statement may be about: those owning the flag; of them, the tools its
    paragraph names, else pretrain_gpt.py's, else all."""
    found = owners(statement.flag)
    named = {name: action for name, action in found.items()
             if name != PRETRAIN and re.search(rf"\b{re.escape(name.split()[0])}", statement.context)}
    if named:
        return named
    return {PRETRAIN: found[PRETRAIN]} if PRETRAIN in found else found


def check_default(statement: Statement) -> str | None:
    """None if the statement is the code's default, else what is wrong."""
    actions = _candidates(statement)
    if not actions:
        return f"{statement}: no parser takes {statement.flag}"
    defaults = {name: default_of(action) for name, action in actions.items()}
    stated = _literal(statement.value)
    if any(_equal(stated, default) for default in defaults.values()):
        return None
    if all(default is None for default in defaults.values()):
        derived = DERIVED.get(statement.flag)
        if derived is None:
            return f"{statement}: the code's default is None; list the derived default in DERIVED"
        if statement.value not in derived[:-1]:
            return f"{statement}: DERIVED says {' or '.join(derived[:-1])} ({derived[-1]})"
        return None
    return f"{statement}: the code's default is " + ", ".join(f"{default!r} ({name})"
                                                                for name, default in defaults.items())


def test_stated_defaults_are_the_codes() -> None:
    statements = default_statements()
    assert len(statements) >= 20, [str(s) for s in statements]
    problems = [p for s in statements if (p := check_default(s))]
    assert not problems, "\n".join(problems)


def test_derived_defaults_are_stated() -> None:
    """DERIVED lists no default the docs no longer state."""
    stated = {s.flag for s in default_statements()}
    assert not set(DERIVED) - stated, set(DERIVED) - stated


# -- allowed values -----------------------------------------------------------------------------

def _items(text: str) -> list[str]:
    """The values a list names: `a|b|c`, or "a, b (note), and c", parentheticals dropped, up to
    the end of the sentence or clause."""
    while re.search(r"\([^()]*\)", text):
        text = re.sub(r"\s*\([^()]*\)", "", text)
    text = re.split(r"[;:]|\.\s|\.$", text.replace("\\|", "|"), maxsplit=1)[0]
    items = [re.sub(r"^(?:now also|and now|now|also) ", "", i.strip().strip("`")) for i in
             re.split(r"\||,\s*(?:and |or )?|\s+(?:or|and)\s+", text)]
    return [i for i in items if i]


def choice_statements() -> list[tuple[Statement, bool]]:
    """(the flag and the values the docs name for it, whether they say these are all of them)."""
    found = []
    for path in DOCUMENTS:
        text = prose(path)
        joined = text.replace("\n", " ")

        def add(offset: int, flag: str, values: str, every: bool) -> None:
            found.append((Statement(f"{path}:{_line(text, offset)}", flag, values, _paragraph(text, offset)), every))

        # `--flag a|b|c` (\| in a table): all of them
        for m in re.finditer(rf"`(?:[^`]* )?(?P<flag>{FLAG}) (?P<values>[\w.-]+(?:\\?\|[\w.-]+)+)`", joined):
            add(m.start(), m["flag"], m["values"], True)
        # `--flag` is one of a, b, c: all of them
        for m in re.finditer(rf"`(?P<flag>{FLAG})` is one of (?P<values>.+?)(?:\.\s|$)", joined):
            add(m.start(), m["flag"], m["values"], True)
        # `... --flag value ...` written in the text: a value to type, so an allowed one (an
        # upper-case word is a placeholder: `--pipeline-schedule S`)
        for m in re.finditer(r"`(--[^`|]+)`", joined):
            words = m[1].split()
            for i, word in enumerate(words):
                values = list(itertools.takewhile(lambda w: not w.startswith("--"), words[i + 1:]))
                if word.startswith("--") and values and not any(re.fullmatch(r"[A-Z]+", v) for v in values):
                    if any(a.choices for a in owners(word).values()):
                        add(m.start(), word, "|".join(values), False)
        # a table headed by a flag: the first cell's value of each row
        for m in re.finditer(rf"^\| `(?P<flag>{FLAG})` \|.*\n\|[- |]+\n(?P<rows>(?:\|.*\n)+)", text, re.M):
            add(m.start(), m["flag"], "|".join(re.findall(r"^\| `([^`]+)`", m["rows"], re.M)), False)
        # a table row of a flag: a cell that is a list of values ("aux_loss, seq_aux_loss or none")
        for m in re.finditer(rf"^\| `(?P<flag>{FLAG})` \|(?P<cells>.*)\|$", text, re.M):
            if not any(a.choices for a in owners(m["flag"]).values()):
                continue
            for cell in m["cells"].split(" | "):
                items = _items(cell)
                if (len(items) >= 2 and all(re.fullmatch(r"[\w.-]+", i) for i in items)
                        and not all(re.fullmatch(r"[A-Z]", i) for i in items)):  # not the scripts column: G, L, M
                    add(m.start(), m["flag"], "|".join(items), False)
        # a list that a paragraph naming a flag introduces ("`--flag` ...:", then "- `value`: ...")
        for m in re.finditer(r"(?:\A|\n\n)(?P<intro>(?:.+\n)*?.*:)\n\n(?P<items>(?:- .*\n(?: .*\n)*)+)", text):
            flags = re.findall(rf"`({FLAG})[ `]", m["intro"])
            values = re.findall(r"^- `([^`]+)`", m["items"], re.M)
            if flags and values:
                add(m.start("items"), flags[0], "|".join(values), False)
    return found


def check_choices(statement: Statement, every: bool) -> str | None:
    actions = _candidates(statement)
    choices = [set(map(str, a.choices)) for a in actions.values() if a.choices]
    if not choices:
        return f"{statement}: no parser gives {statement.flag} a fixed set of values"
    stated = set(_items(statement.value))
    if any(stated == allowed if every else stated <= allowed for allowed in choices):
        return None
    return f"{statement}: the code allows " + " or ".join(", ".join(sorted(c)) for c in choices)


def test_stated_values_are_allowed() -> None:
    statements = choice_statements()
    assert len(statements) >= 10, [str(s) for s, _ in statements]
    problems = [p for s, every in statements if (p := check_choices(s, every))]
    assert not problems, "\n".join(problems)


# -- preset shapes ------------------------------------------------------------------------------

# What the docs say of a run's shape, and the config field (or count) it is.
SHAPE_FACTS = {
    r"(?P<v>Llama|GPT-2) family": lambda c: {"llama": "Llama", "gpt2": "GPT-2"}[c.model.family],
    r"(?P<v>\d+) layers": lambda c: c.model.num_layers,
    r"hidden (?P<v>\d+)": lambda c: c.model.hidden_size,
    r"(?P<v>\d+) (?:attention|query) heads": lambda c: c.model.num_attention_heads,
    r"(?P<v>\d+) key/value heads": lambda c: c.model.num_query_groups or c.model.num_attention_heads,
    r"(?P<v>\d+) experts": lambda c: c.model.num_experts,
    r"top-(?P<v>\d+)": lambda c: c.model.moe_router_topk,
    r"\bseq (?P<v>\d+)": lambda c: c.model.seq_length,
    r"\d+ x (?P<v>\d+) tokens": lambda c: c.model.seq_length,
    # the byte tokenizer's vocabulary (its 258 ids, padded), which a run without --tokenizer-type trains
    r"(?P<v>[\d.]+)M parameters": lambda c: count_parameters(c.updated(model={"vocab_size": 258}).model) / 1e6,
}
# What a preset's own run (not `--model X` among other flags) and a command's comment say besides.
RUN_FACTS = {r"(?P<v>\d+) x \d+ tokens": lambda c: c.train.global_batch_size}
# What a command's comment says of its layout.
LAYOUT_FACTS = {rf"\b{axis} (?P<v>\d+)": (lambda c, field=field: getattr(c.parallel, field))
                for axis, field in (("tp", "tensor_model_parallel_size"), ("pp", "pipeline_model_parallel_size"),
                                    ("dp", "data_parallel_size"), ("cp", "context_parallel_size"))}
LAYOUT_FACTS[r"experts over (?P<v>\d+) ranks"] = lambda c: c.parallel.expert_model_parallel_size
PRESET_NAMES = "|".join(re.escape(name) for name in sorted(PRESETS, key=len, reverse=True))


@dataclasses.dataclass
class Shape:
    where: str
    flags: list[str]
    world: int
    said: str
    facts: dict


def shape_statements() -> list[Shape]:
    """A preset named in the text and the clause after it, or a command's comment."""
    found = []
    clause = r"(?P<said>(?:[^.;)]|\.(?=\d))*)"  # to the clause's end (0.9M is not one)
    for path in DOCUMENTS:
        text = prose(path)
        for m in re.finditer(rf"(?:`(?P<flag>--model )?(?P<a>{PRESET_NAMES})`|the (?P<b>{PRESET_NAMES}) demo model)"
                             + clause, text.replace("\n", " ")):
            facts = SHAPE_FACTS if m["flag"] else {**SHAPE_FACTS, **RUN_FACTS}
            found.append(Shape(f"{path}:{_line(text, m.start())}", ["--model", m["a"] or m["b"]], 1, m["said"], facts))
        raw = (ROOT / path).read_text()
        for m in re.finditer(r"^(?P<launch>.*)pretrain_gpt\.py (?P<args>.*--model .*?)\s+# (?P<said>.*)$", raw, re.M):
            nproc = re.search(r"--nproc-per-node (\d+)", m["launch"])
            found.append(Shape(f"{path}:{_line(raw, m.start())}", m["args"].split(), int(nproc[1]) if nproc else 1,
                               m["said"], {**SHAPE_FACTS, **RUN_FACTS, **LAYOUT_FACTS}))
    return found


def check_shape(shape: Shape) -> list[str]:
    problems, config = [], None
    for fact, field in shape.facts.items():
        for m in re.finditer(fact, shape.said):
            config = config or parse_args(shape.flags, world_size=shape.world)
            actual, stated = field(config), m["v"]
            if re.fullmatch(r"\d+\.\d+", stated):
                actual, stated = round(actual, len(stated.split(".")[1])), float(stated)
            elif stated.isdigit():
                stated = int(stated)
            if actual != stated:
                problems.append(f"{shape.where}: {' '.join(shape.flags)}: says {m[0]!r}, the code has {actual}")
    return problems


def test_stated_shapes_are_the_codes() -> None:
    statements = shape_statements()
    checked = [s for s in statements if any(re.search(fact, s.said) for fact in s.facts)]
    assert len(checked) >= 10, statements
    problems = [p for s in statements for p in check_shape(s)]
    assert not problems, "\n".join(problems)


# -- defaults said in words ---------------------------------------------------------------------

def _benchmark_training(device: str) -> list:
    from tools.benchmark_training import build_config, common_flags, parse_tool_args
    args, _ = parse_tool_args(["--device", device])
    config = build_config(common_flags(args, []), args.vocab_size)
    return [config.model.num_layers, config.model.hidden_size, config.model.seq_length, config.model.vocab_size,
            config.train.micro_batch_size, args.warmup, args.steps]


def _tool_defaults(tool: str, *flags: str) -> list:
    values = [default_of(owners(flag)[tool]) for flag in flags]
    return [x for v in values for x in (v if isinstance(v, list) else [v])]


# Defaults the docs give in words rather than at a flag: (document, the words, whose groups are the
# numbers or names the code reports).
WORDED = [
    ("docs/testing.md", r"the (\d+)-minute collective timeout \(`--distributed-timeout-minutes`\)",
     lambda: [_field_defaults()["distributed_timeout_minutes"]]),
    ("docs/planner.md", r"the presets (carry no batch size)",
     lambda: ["carry no batch size"] if not any({"micro_batch_size", "global_batch_size"} & set(p)
                                                for p in PRESETS.values()) else ["carry batch sizes"]),
    ("docs/checkpoints.md", r"by default (\d+) and (\d+) layers at hidden (\d+)",
     lambda: _tool_defaults("bench_state_memory.py", "--layers", "--hidden-size")),
    ("docs/parallelism.md", r"`tools/compare_parallelism.py` trains one model \((\d+) layers, hidden (\d+)",
     lambda: _tool_defaults("compare_parallelism.py", "--num-layers", "--hidden-size")),
    ("BENCHMARKS.md", r"On a GPU the default is the `llama-1b` preset at seq (\d+), vocab (\d+), micro batch (\d+), "
                      r"bf16 \(.*?\), (\d+) warm-up and (\d+) timed steps",
     lambda: [_benchmark_training("cuda")[i] for i in (2, 3, 4, 5, 6)]),
    ("BENCHMARKS.md",
     r"the tiny default shape \((\d+) layers, hidden (\d+), seq (\d+), vocab (\d+), micro batch (\d+)\)",
     lambda: _benchmark_training("cpu")[:5]),
    ("BENCHMARKS.md", r"`--ops rmsnorm,flash_attention` picks ops \(default `(all)`: ((?:`\w+`(?:, (?:and )?)?)+)",
     lambda: [default_of(owners("--ops")["bench_kernels.py"]),
              list(importlib.import_module("tools.kernel_bench_cases").OPS)]),
]


@pytest.mark.parametrize("document, words, code", WORDED, ids=[f"{d}:{w[:30]}" for d, w, _ in WORDED])
def test_defaults_said_in_words_are_the_codes(document: str, words: str, code: object) -> None:
    m = re.search(words, prose(document).replace("\n", " "))
    assert m, f"{document} no longer says {words!r}: update WORDED to what it says now"
    stated = [float(g) if re.fullmatch(r"[\d.]+", g) else re.findall(r"`(\w+)`", g) if "`" in g else g
              for g in m.groups()]
    actual = [float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v for v in code()]
    assert stated == actual, f"{document}: says {m[0]!r}, the code has {actual}"
