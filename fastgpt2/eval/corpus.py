"""Documents to score: a text file, JSONL with a `text` field, or a directory of either."""
from __future__ import annotations

import json
from pathlib import Path


def read_documents(path) -> list[str]:
    """The documents under `path`, each scored with its own windows.

    A `.jsonl` file gives one document per non-blank line (an object with a string `text` field); any other file is
    one UTF-8 document; a directory gives the documents of every file under it (hidden ones skipped), in path order.
    """
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"--data {path}: no such file or directory")
    files = [root] if root.is_file() else sorted(
        p for p in root.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts))
    documents = [doc for p in files for doc in _read_file(p)]
    if not documents:
        raise ValueError(f"--data {path} holds no documents; point it at a text file, JSONL or a directory of them")
    return documents


def _read_file(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}); convert it first") from None
    if path.suffix != ".jsonl":
        return [text]
    documents = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number} is not valid JSON ({exc.msg}); each line must be one object") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ValueError(f"{path}:{number} has no string `text` field; each line must be {{\"text\": \"...\"}}")
        documents.append(record["text"])
    return documents
