"""Preference pairs: parse HH-RLHF and PKU-SafeRLHF, load the vendored data, split by prompt, collate to tensors."""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .files import read_results

logger = logging.getLogger(__name__)

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
HH_DIR = "hh-rlhf"
PKU_FILE = "pku-saferlhf/safer-pairs.json"
PKU_SOURCE = "pku-saferlhf"

# HH-RLHF subsets per objective. PKU-SafeRLHF joins harmlessness by default; its license is non-commercial
# (CC BY-NC 4.0), so what is trained on it inherits that license; ``include_pku=False`` keeps to MIT data.
OBJECTIVE_SOURCES: dict[str, tuple[str, ...]] = {
    "helpfulness": ("helpful-base", "helpful-online", "helpful-rejection-sampled"),
    "harmlessness": ("harmless-base",),
}
SOURCE_OBJECTIVE: dict[str, str] = {
    source: objective for objective, sources in OBJECTIVE_SOURCES.items() for source in sources
} | {PKU_SOURCE: "harmlessness"}

SPLIT_NAMES = ("train", "validation", "test")
HH_COLUMNS = ("chosen", "rejected")
PKU_COLUMNS = ("prompt", "response")

_ROLES = {"Human": "user", "Assistant": "assistant"}
# A turn starts at the beginning of the text (after any whitespace) or after a blank line; a bare
# "Human:" inside a sentence is text, not a turn.
_TURN_MARKER = re.compile(r"(?:\A\s*|\n\n)(Human|Assistant):")


@dataclass
class PreferencePair:
    """One comparison: two replies to the same chat prompt, the first preferred for ``objective``."""

    prompt: list[dict] = field(
        metadata={"help": 'chat messages {"role": "user"|"assistant", "content": str}, ending with a user turn'}
    )
    chosen: str = field(metadata={"help": "the preferred assistant reply"})
    rejected: str = field(metadata={"help": "the dispreferred assistant reply"})
    objective: str = field(metadata={"help": "the objective the preference is about, e.g. 'helpfulness'"})
    source: str = field(metadata={"help": "the subset it came from, e.g. 'helpful-base' or 'pku-saferlhf'"})
    id: str = field(default="", metadata={"help": "stable content hash; filled in when left empty"})

    def __post_init__(self):
        if not self.id:
            self.id = pair_id(self.prompt, self.chosen, self.rejected, self.source)


def pair_id(prompt: list[dict], chosen: str, rejected: str, source: str) -> str:
    """A 16-hex-digit hash of the pair's content: the same pair gets the same id on every machine."""
    payload = json.dumps([source, prompt, chosen, rejected], ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def prompt_key(prompt: list[dict]) -> str:
    """The prompt rendered to one canonical string: pairs with equal keys share a prompt."""
    return json.dumps([[message["role"], message["content"]] for message in prompt], ensure_ascii=False)


# ---------------------------------------------------------------------------------------------- parsing


def parse_hh_dialogue(text: str) -> list[dict]:
    """Split an HH-RLHF transcript (``"\\n\\nHuman: ...\\n\\nAssistant: ..."``) into chat messages.

    A turn starts with ``Human:`` or ``Assistant:`` at the start of the text or after a blank line;
    the same words elsewhere are part of the text. Contents are stripped; newlines inside a turn are
    kept. Two consecutive turns of one speaker (HH-RLHF has replies that themselves contain
    ``"\\n\\nAssistant:"``) are merged into one message holding the original text verbatim, so the
    roles alternate.

    Raises:
        ValueError: when ``text`` holds no turn or has text before its first turn.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    markers = list(_TURN_MARKER.finditer(text))
    if not markers or text[: markers[0].start()].strip():
        raise ValueError(f"text must start with a 'Human:' or 'Assistant:' turn, got {text[:60]!r}")
    spans: list[list] = []  # [role, content start, content end]
    for marker, following in zip(markers, [*markers[1:], None]):
        role = _ROLES[marker.group(1)]
        end = following.start() if following is not None else len(text)
        if spans and spans[-1][0] == role:
            spans[-1][2] = end
        else:
            spans.append([role, marker.end(), end])
    return [{"role": role, "content": text[start:end].strip()} for role, start, end in spans]


def parse_hh_pair(record: Mapping, objective: str, source: str) -> PreferencePair | None:
    """Turn an HH-RLHF record ``{"chosen": transcript, "rejected": transcript}`` into a pair.

    The prompt is every message before the final assistant turn. When the two transcripts differ
    earlier (a few HH-RLHF records do), the prompt is their longest common prefix of messages and the
    replies are the two assistant turns where they part.

    Returns:
        ``None`` when there is nothing to learn from: the replies are equal (after stripping) or
        empty, or the structure is broken (no turns, the transcripts part at a user turn, one ends early).
    """
    missing = [key for key in HH_COLUMNS if key not in record]
    if missing:
        raise ValueError(f"an HH-RLHF record needs keys {list(HH_COLUMNS)}, missing {missing} in {sorted(record)}")
    try:
        chosen = parse_hh_dialogue(record["chosen"])
        rejected = parse_hh_dialogue(record["rejected"])
    except (TypeError, ValueError):
        return None
    common = 0
    while common < min(len(chosen), len(rejected)) and chosen[common] == rejected[common]:
        common += 1
    if common == 0 or common >= len(chosen) or common >= len(rejected):
        return None  # identical transcripts, no shared context, or one transcript stops at the shared part
    prompt = chosen[:common]
    chosen_reply, rejected_reply = chosen[common], rejected[common]
    if prompt[-1]["role"] != "user" or chosen_reply["role"] != "assistant" or rejected_reply["role"] != "assistant":
        return None
    if not chosen_reply["content"] or not rejected_reply["content"]:
        return None
    return PreferencePair(prompt, chosen_reply["content"], rejected_reply["content"], objective, source)


def parse_pku_pair(record: Mapping, objective: str = "harmlessness", source: str = PKU_SOURCE) -> PreferencePair | None:
    """Turn a PKU-SafeRLHF record ``{"prompt": str, "response": [safer, unsafe]}`` into a single-turn pair.

    Returns ``None`` when the two responses are equal (after stripping) or one is empty.
    """
    prompt, responses = record.get("prompt"), record.get("response")
    if not isinstance(prompt, str) or not isinstance(responses, Sequence) or isinstance(responses, str) or len(responses) != 2:
        raise ValueError(f'a PKU-SafeRLHF record must be {{"prompt": str, "response": [safer, unsafe]}}, got {_short(record)}')
    if not all(isinstance(response, str) for response in responses):
        raise ValueError(f"PKU-SafeRLHF responses must be strings, got {_short(responses)}")
    chosen, rejected = (response.strip() for response in responses)
    if not chosen or not rejected or chosen == rejected:
        return None
    return PreferencePair([{"role": "user", "content": prompt.strip()}], chosen, rejected, objective, source)


def _short(value, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


# ---------------------------------------------------------------------------------------------- loading


def _open_text(path: Path):
    with open(path, "rb") as handle:
        gzipped = handle.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rt", encoding="utf-8") if gzipped else open(path, encoding="utf-8")


def _detect_format(columns: Iterable[str], where: str) -> str:
    """``"hh"`` for ``chosen``/``rejected`` columns, ``"pku"`` for ``prompt``/``response``."""
    columns = set(columns)
    if set(HH_COLUMNS) <= columns:
        return "hh"
    if set(PKU_COLUMNS) <= columns:
        return "pku"
    raise ValueError(
        f"{where}: expected keys {list(HH_COLUMNS)} (HH-RLHF) or {list(PKU_COLUMNS)} (PKU-SafeRLHF), got {sorted(columns)}"
    )


def _check_record(record, format_name: str | None, where: str) -> str:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    detected = _detect_format(record, where)
    if format_name is not None and detected != format_name:
        raise ValueError(f"{where}: keys {sorted(record)} do not match the {format_name!r} format of the records before it")
    columns = HH_COLUMNS if detected == "hh" else PKU_COLUMNS
    for column in columns:
        value = record[column]
        if column == "response":  # [safer, unsafe]
            ok = isinstance(value, list) and len(value) == 2 and all(isinstance(text, str) for text in value)
        else:
            ok = isinstance(value, str)
        if not ok:
            raise ValueError(f"{where}: {column!r} has the wrong type or length: {_short(value)}")
    return detected


def read_json_values(path: str | Path) -> list[tuple[str, object]]:
    """Every value of a JSON-lines file (optionally gzipped) or of one JSON list, with where it sits in the file.

    Returns:
        ``(where, value)`` pairs, ``where`` naming the file and the line (JSON lines) or the item (a JSON list).

    Raises:
        ValueError: naming the file and the line that is not valid JSON, or a file that is not UTF-8 text.
    """
    path = Path(path)
    try:
        with _open_text(path) as handle:
            text = handle.read()
    except (OSError, EOFError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: cannot be read as UTF-8 text ({error})") from error
    if text.lstrip().startswith("["):
        try:
            values = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: line {error.lineno}, column {error.colno}: invalid JSON ({error.msg})") from None
        return [(f"{path}: item {index}", value) for index, value in enumerate(values)]
    found = []
    for number, line in enumerate(text.split("\n"), start=1):  # not splitlines(): JSON strings may hold U+2028
        if not line.strip():
            continue
        try:
            found.append((f"{path}: line {number}", json.loads(line)))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: line {number}: invalid JSON ({error.msg})") from None
    return found


def read_records(path: str | Path) -> tuple[str, list[dict]]:
    """Read and validate a preference file: JSON lines (optionally gzipped) or one JSON list.

    Returns:
        The format (``"hh"`` or ``"pku"``) and the records.

    Raises:
        ValueError: naming the file and the line (JSON lines) or the item (a JSON list) that is broken.
    """
    format_name, records = None, []
    for where, record in read_json_values(path):
        format_name = _check_record(record, format_name, where)
        records.append(record)
    if not records:
        raise ValueError(f"{path}: holds no records")
    return format_name, records


def _source_name(path: Path) -> str:
    """``helpful-base`` from ``helpful-base.jsonl.gz``."""
    name = path.name
    for suffix in (".gz", ".jsonl", ".json"):
        name = name.removesuffix(suffix)
    return name


def _is_local(path_or_hub_id: str | Path) -> bool:
    path = Path(path_or_hub_id)
    if path.exists():
        return True
    text = str(path_or_hub_id)
    looks_like_file = text.endswith((".json", ".jsonl", ".gz")) or text.startswith((".", "/")) or isinstance(path_or_hub_id, Path)
    if looks_like_file:
        raise FileNotFoundError(f"preference file {text!r} does not exist")
    return False


def load_pairs(
    path_or_hub_id: str | Path,
    objective: str | None = None,
    source: str | None = None,
    split: str = "train",
    **load_kwargs,
) -> list[PreferencePair]:
    """Load preference pairs from a local file or a Hugging Face hub dataset.

    The format is detected from the columns: ``chosen``/``rejected`` transcripts (HH-RLHF) or
    ``prompt``/``response`` (PKU-SafeRLHF). Pairs with nothing to learn from are dropped (see
    :func:`parse_hh_pair`).

    Args:
        path_or_hub_id: a ``.jsonl``, ``.jsonl.gz`` or ``.json`` file, or a hub id such as
            ``"Anthropic/hh-rlhf"`` (needs the network; pass ``data_dir="harmless-base"`` and
            ``split="test"`` through ``split`` / ``load_kwargs``).
        objective: the objective of every pair; defaults to the one :data:`SOURCE_OBJECTIVE` gives ``source``.
        source: the subset name; defaults to the file name (``helpful-base.jsonl.gz`` → ``helpful-base``),
            the hub ``data_dir``, or ``pku-saferlhf`` for PKU-format data.
        split: the split a hub dataset is read from (a local file has one split).
        load_kwargs: passed to ``datasets.load_dataset`` for a hub id.

    Raises:
        ValueError: a malformed file (naming the file and line), or no objective known for ``source``.
    """
    if isinstance(path_or_hub_id, (str, Path)) and str(path_or_hub_id).startswith("~"):
        path_or_hub_id = Path(path_or_hub_id).expanduser()
    if _is_local(path_or_hub_id):
        path = Path(path_or_hub_id)
        format_name, records = read_records(path)  # datasets' own errors do not name the line
        try:
            from datasets import load_dataset
        except ImportError:  # an optional extra; the validated records are the same data
            load_dataset = None
        if load_dataset is not None:
            dataset = load_dataset("json", data_files=str(path), split="train")
            format_name = _detect_format(dataset.column_names, str(path))
            records = dataset.to_list()
        default_source = _source_name(path)
    else:
        from datasets import load_dataset

        dataset = load_dataset(str(path_or_hub_id), split=split, **load_kwargs)
        format_name = _detect_format(dataset.column_names, str(path_or_hub_id))
        records = dataset.to_list()
        default_source = Path(str(load_kwargs.get("data_dir") or path_or_hub_id)).name
    if format_name == "pku":
        default_source = PKU_SOURCE
    source = source or default_source
    objective = objective or SOURCE_OBJECTIVE.get(source)
    if objective is None:
        raise ValueError(f"no objective known for source {source!r}: pass objective= (known sources: {sorted(SOURCE_OBJECTIVE)})")
    if format_name == "hh":
        pairs = [parse_hh_pair(record, objective, source) for record in records]
    else:
        pairs = [parse_pku_pair(record, objective, source) for record in records]
    kept = [pair for pair in pairs if pair is not None]
    if len(kept) < len(records):
        dropped = len(records) - len(kept)
        logger.info("%s: dropped %d of %d pairs (equal or empty replies, broken transcripts)", source, dropped, len(records))
    return kept


def load_default_pairs(include_pku: bool = True, data_dir: str | Path | None = None) -> dict[str, list[PreferencePair]]:
    """The vendored HH-RLHF pairs (and, opt-in, PKU-SafeRLHF) grouped by objective.

    Args:
        include_pku: add PKU-SafeRLHF's safer/unsafe pairs to ``harmlessness`` (the default). Its license
            (CC BY-NC 4.0) allows non-commercial use only; ``False`` keeps to HH-RLHF (MIT).
        data_dir: the folder holding ``hh-rlhf/`` (and ``pku-saferlhf/``); defaults to the repository's ``data/``.

    Returns:
        ``{"helpfulness": [...], "harmlessness": [...]}`` in a fixed order (subsets as listed in
        :data:`OBJECTIVE_SOURCES`, records in file order).
    """
    data_dir = Path(data_dir) if data_dir is not None else DATA_DIR
    pairs: dict[str, list[PreferencePair]] = {}
    for objective, sources in OBJECTIVE_SOURCES.items():
        pairs[objective] = []
        for source in sources:
            path = data_dir / HH_DIR / f"{source}.jsonl.gz"
            if not path.is_file():
                raise FileNotFoundError(f"vendored data file {path} is missing (data_dir={str(data_dir)!r})")
            pairs[objective] += load_pairs(path, objective, source)
    if include_pku:
        path = data_dir / PKU_FILE
        if not path.is_file():
            raise FileNotFoundError(f"PKU-SafeRLHF file {path} is missing (data_dir={str(data_dir)!r})")
        pairs[SOURCE_OBJECTIVE[PKU_SOURCE]] += load_pairs(path)
    return pairs


# ---------------------------------------------------------------------------------------------- splitting


_WORD = re.compile(r"[a-z0-9]+")


def normalized_opening(prompt: list[dict]) -> str:
    """The prompt's first user turn lowercased to its words: formatting variants and dialogues that open alike agree."""
    first = next((message["content"] for message in prompt if message["role"] == "user"), "")
    return " ".join(_WORD.findall(first.lower()))


def near_duplicate_groups(
    prompts: Sequence[list[dict]], threshold: float = 0.7, num_hashes: int = 24, band_size: int = 2
) -> list[int]:
    """A group id per prompt; prompts whose openings (:func:`normalized_opening`) are equal or share at least
    ``threshold`` of their words (Jaccard) are joined, transitively.

    Candidates come from MinHash bands over word sets (``num_hashes // band_size`` bands of ``band_size``), so
    the cost stays near-linear; every candidate pair is checked exactly. A group id is the index of one member.
    """
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
    parent = list(range(len(prompts)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(i: int, j: int) -> None:
        root_i, root_j = find(i), find(j)
        if root_i != root_j:
            parent[max(root_i, root_j)] = min(root_i, root_j)

    openings = [normalized_opening(prompt) for prompt in prompts]
    words = [frozenset(opening.split()) for opening in openings]
    buckets: dict[object, int] = {}
    for index, (opening, word_set) in enumerate(zip(openings, words)):
        keys: list[object] = [("text", opening)]
        if word_set:
            hashes = [
                min(int.from_bytes(hashlib.blake2b(f"{seed}:{word}".encode(), digest_size=8).digest(), "big") for word in word_set)
                for seed in range(num_hashes)
            ]
            keys += [("band", start, tuple(hashes[start : start + band_size])) for start in range(0, num_hashes, band_size)]
        for key in keys:
            other = buckets.setdefault(key, index)
            if other == index or find(other) == find(index):
                continue
            if key[0] == "text" or len(word_set & words[other]) >= threshold * len(word_set | words[other]):
                union(index, other)
    return [find(index) for index in range(len(prompts))]


def split_pairs(
    pairs: Sequence[PreferencePair], seed: int = 0, fractions: Sequence[float] = (0.8, 0.1, 0.1)
) -> dict[str, list[PreferencePair]]:
    """Split pairs into train / validation / test so that no prompt, nor a near-duplicate of it, lands in two splits.

    Prompts are grouped by :func:`near_duplicate_groups` (equal openings after normalisation, or openings sharing
    70% of their words); a group is placed by a hash of (seed, its smallest prompt key), so a prompt with no
    near-duplicate is placed by its own key alone. Split the pairs of all objectives in one call (see
    :func:`split_pools`) so that a group shared across objectives is grouped alike. Split sizes match
    ``fractions`` approximately (by group, not by pair). Pairs keep their input order within a split.

    Args:
        fractions: ``(train, validation, test)``, non-negative, summing to 1.
    """
    fractions = tuple(float(fraction) for fraction in fractions)
    if len(fractions) != len(SPLIT_NAMES):
        raise ValueError(f"fractions must hold {len(SPLIT_NAMES)} numbers {SPLIT_NAMES}, got {fractions!r}")
    if any(not fraction >= 0 for fraction in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"fractions must be non-negative and sum to 1, got {fractions!r} (sum {sum(fractions):.6g})")
    if not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    bounds = [sum(fractions[: index + 1]) for index in range(len(fractions))]
    bounds[-1] = 1.0 + 1e-12  # float sums may fall short of 1
    keys = [prompt_key(pair.prompt) for pair in pairs]
    prompts = {key: pair.prompt for key, pair in zip(keys, pairs)}
    distinct = sorted(prompts)
    groups = near_duplicate_groups([prompts[key] for key in distinct])
    representative: dict[int, str] = {}
    for key, group in zip(distinct, groups):
        representative.setdefault(group, key)  # distinct is sorted: the first member seen is the smallest key
    group_key = {key: representative[group] for key, group in zip(distinct, groups)}
    splits: dict[str, list[PreferencePair]] = {name: [] for name in SPLIT_NAMES}
    for pair, key in zip(pairs, keys):
        digest = hashlib.sha256(f"{seed}\n{group_key[key]}".encode("utf-8")).digest()
        position = int.from_bytes(digest[:8], "big") / 2**64  # uniform in [0, 1)
        name = next(name for name, bound in zip(SPLIT_NAMES, bounds) if position < bound)
        splits[name].append(pair)
    return splits


def split_pools(
    pools: Mapping[str, Sequence[PreferencePair]], seed: int = 0, fractions: Sequence[float] = (0.8, 0.1, 0.1)
) -> dict[str, dict[str, list[PreferencePair]]]:
    """:func:`split_pairs` over every objective's pairs at once: ``{objective: {split: pairs}}``."""
    everything = [pair for pairs in pools.values() for pair in pairs]
    owner = [name for name, pairs in pools.items() for _ in pairs]
    tagged = split_pairs([_Tagged(pair, name) for pair, name in zip(everything, owner)], seed, fractions)
    result = {name: {split: [] for split in SPLIT_NAMES} for name in pools}
    for split, items in tagged.items():
        for item in items:
            result[item.owner][split].append(item.pair)
    return result


@dataclass
class _Tagged:
    pair: PreferencePair
    owner: str

    @property
    def prompt(self) -> list[dict]:
        return self.pair.prompt



# ---------------------------------------------------------------------------------------------- collating


@dataclass
class PreferenceCollator:
    """Turn preference pairs into left-padded chosen / rejected token tensors for a chat model.

    Each sequence is ``chat_template(prompt, add_generation_prompt=True) + reply + eos``. The
    ``response_mask`` marks the reply's tokens and the final eos; the losses shift it together with
    the labels. A prompt longer than ``max_prompt_length`` loses whole turns from its start (keeping
    the last user turn), then tokens from its start; a reply longer than what ``max_length`` leaves
    is cut at its end. Chosen and rejected share one length ``T`` so they can run as one batch.

    Example:
        >>> from paretoalign.testing import tiny_tokenizer
        >>> objectives = ["helpfulness", "harmlessness"]
        >>> collator = PreferenceCollator(tiny_tokenizer(), max_length=64, max_prompt_length=32, objectives=objectives)
        >>> pair = PreferencePair([{"role": "user", "content": "Hi"}], "Hello!", "Go away.", "helpfulness", "example")
        >>> batch = collator([pair, pair])
        >>> batch["chosen_input_ids"].shape == batch["rejected_response_mask"].shape  # (B, T)
        True
        >>> batch["objective"].tolist()
        [0, 0]
    """

    tokenizer: object = field(metadata={"help": "a transformers tokenizer with a chat template and an eos token"})
    max_length: int = field(default=1024, metadata={"help": "the most tokens of prompt + reply + eos"})
    max_prompt_length: int = field(default=512, metadata={"help": "the most tokens of the templated prompt"})
    objectives: Sequence[str] | None = field(default=None, metadata={"help": "objective names; adds a (B,) 'objective' index"})

    def __post_init__(self):
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("tokenizer has no chat_template; PreferenceCollator renders prompts with it")
        if self.tokenizer.eos_token_id is None:
            raise ValueError("tokenizer has no eos token; every reply ends with it")
        if not 0 < self.max_prompt_length < self.max_length:
            raise ValueError(
                "need 0 < max_prompt_length < max_length, "
                f"got max_prompt_length={self.max_prompt_length}, max_length={self.max_length}"
            )
        if self.objectives is not None:
            self.objectives = list(self.objectives)
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else self.tokenizer.eos_token_id

    def _template(self, messages: list[dict]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]  # the template holds the special tokens

    def prompt_ids(self, prompt: list[dict]) -> list[int]:
        """The templated prompt's token ids, truncated from the left to ``max_prompt_length``."""
        ids = self._template(prompt)
        if len(ids) <= self.max_prompt_length:
            return ids
        # Drop whole turns first so the template's role markers stay intact; restart at a user turn.
        user_turns = [index for index, message in enumerate(prompt) if message["role"] == "user"]
        for start in user_turns[1:]:
            ids = self._template(prompt[start:])
            if len(ids) <= self.max_prompt_length:
                return ids
        return ids[-self.max_prompt_length :]

    def response_ids(self, response: str, budget: int, eos: bool = True) -> list[int]:
        """The reply's token ids plus eos (unless ``eos`` is false: a reply cut off by a length limit), cut at
        the end to ``budget`` tokens."""
        ids = self.tokenizer(response, add_special_tokens=False)["input_ids"] + ([self.tokenizer.eos_token_id] if eos else [])
        return ids[:budget]

    def encode_pair(self, pair: PreferencePair) -> tuple[list[int], list[int], int]:
        """Unpadded token ids of the chosen and rejected sequences, and the number of prompt tokens they share."""
        prompt = self.prompt_ids(pair.prompt)
        budget = self.max_length - len(prompt)
        return prompt + self.response_ids(pair.chosen, budget), prompt + self.response_ids(pair.rejected, budget), len(prompt)

    def __call__(self, pairs: Sequence[PreferencePair]) -> dict[str, torch.Tensor]:
        if not pairs:
            raise ValueError("pairs must hold at least one PreferencePair, got an empty batch")
        sequences = {"chosen": [], "rejected": []}  # per side: (ids, number of prompt tokens)
        for pair in pairs:
            chosen, rejected, prompt_length = self.encode_pair(pair)
            sequences["chosen"].append((chosen, prompt_length))
            sequences["rejected"].append((rejected, prompt_length))
        length = max(len(ids) for side in sequences.values() for ids, _ in side)
        batch: dict[str, torch.Tensor] = {}
        for side, rows in sequences.items():
            input_ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)  # (B, T)
            attention_mask = torch.zeros((len(rows), length), dtype=torch.long)  # (B, T)
            response_mask = torch.zeros((len(rows), length), dtype=torch.long)  # (B, T)
            for row, (ids, prompt_length) in enumerate(rows):
                start = length - len(ids)  # left padding
                input_ids[row, start:] = torch.tensor(ids, dtype=torch.long)
                attention_mask[row, start:] = 1
                response_mask[row, start + prompt_length :] = 1
            batch[f"{side}_input_ids"] = input_ids
            batch[f"{side}_attention_mask"] = attention_mask
            batch[f"{side}_response_mask"] = response_mask
        if self.objectives is not None:
            unknown = sorted({pair.objective for pair in pairs} - set(self.objectives))
            if unknown:
                raise ValueError(f"pair objectives {unknown} are not in objectives {self.objectives}")
            batch["objective"] = torch.tensor([self.objectives.index(pair.objective) for pair in pairs], dtype=torch.long)  # (B,)
        return batch


REPLIES_NAME = "replies.jsonl"  # a sampling folder's replies (paretoalign sample-replies), one prompt per line


def read_replies(directory: str | os.PathLike) -> list[dict]:
    """The complete prompt lines of a sampling folder (a cut-off last line is dropped)."""
    return read_results(Path(directory) / REPLIES_NAME)
