"""prepare_data: text or JSONL (`text` records) -> uint16 .bin shards, streamed with a progress bar, for corpora that
are bigger than memory or tokenised once for many runs. A Texar directory gives train_*.bin and val_*.bin."""
from __future__ import annotations

from pathlib import Path

from fastgpt2.train import data
from fastgpt2.train.shards import ShardWriter

_ENCODE_CHUNK = 1024  # documents per tokenizer batch


def prepare_data(input_path: str, output_dir: str, *, prefix: str = "train", shard_tokens: int = 100_000_000,
                 whole_file: bool = False, tokenizer=None, progress: bool = True) -> list[Path]:
    """Tokenise `input_path` into `<output_dir>/<prefix>_000000.bin`, ... (documents each followed by
    <|endoftext|>); a directory with Texar's train.txt / dev.txt writes train_* and val_* shards. Returns the paths.
    Prompt/completion records are refused: a shard has no room for their loss mask (train on the JSONL directly)."""
    from fastgpt2.model.tokenizer import Tokenizer

    tokenizer = tokenizer or Tokenizer.from_pretrained()
    source = Path(input_path).expanduser()
    if not source.exists():
        raise FileNotFoundError(f"input {input_path} does not exist; pass a text or .jsonl file or a Texar directory")
    if source.is_dir():
        jobs = [(split_prefix, data.find_files(input_path, split)) for split, split_prefix in
                (("train", "train"), ("valid", "val")) if _has_split(source, split)]
        if not jobs:
            raise FileNotFoundError(f"directory {input_path} holds none of {', '.join(data.SPLIT_FILES['train'])}")
    else:
        jobs = [(prefix, data.find_files(input_path, "train"))]
    paths = []
    for split_prefix, (kind, files) in jobs:
        if kind == "bin":
            raise ValueError(f"{files[0]} is already a token shard; pass the text it came from")
        paths += _write_split(files, kind, Path(output_dir), split_prefix, shard_tokens, whole_file, tokenizer,
                              progress)
    return paths


def _has_split(directory: Path, split: str) -> bool:
    return any((directory / name).is_file() and not name.endswith(".bin") for name in data.SPLIT_FILES[split])


def _write_split(files, kind, output_dir, prefix, shard_tokens, whole_file, tokenizer, progress) -> list[Path]:
    from tqdm import tqdm

    writer = ShardWriter(output_dir, prefix, shard_tokens)
    eos = tokenizer.eos_token_id
    total_bytes = sum(f.stat().st_size for f in files)
    with tqdm(total=total_bytes, unit="B", unit_scale=True, desc=f"{prefix} shards", disable=not progress) as bar:
        for f in files:
            batch: list[str] = []
            for doc in data.iter_documents(f, kind, whole_file):
                if not isinstance(doc, str):
                    raise ValueError(f"{f} holds prompt/completion records, whose loss mask a .bin shard cannot "
                                     "keep; pass the JSONL file to `fastgpt2 finetune --train` directly")
                batch.append(doc)
                if len(batch) == _ENCODE_CHUNK:
                    _write_batch(batch, writer, tokenizer, eos, bar)
                    batch = []
            _write_batch(batch, writer, tokenizer, eos, bar)
    paths = writer.close()
    if not paths:
        raise ValueError(f"{files[0]} holds no documents (every line is empty)")
    if progress:
        print(f"{prefix}: {writer.num_tokens:,} tokens in {len(paths)} shard(s) under {output_dir}")
    return paths


def _write_batch(batch: list[str], writer: ShardWriter, tokenizer, eos: int, bar) -> None:
    for ids in tokenizer.encode_batch(batch, allow_special=True):
        writer.write(ids + [eos])
    bar.update(sum(len(doc.encode("utf-8")) + 1 for doc in batch))
