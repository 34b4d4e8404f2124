"""Beam search on the paged KV cache, step for step transformers' `generate(num_beams=k, do_sample=False)`.

Each live beam is a Sequence. A parent picked by several candidates forks (all its blocks shared, reference counted;
the partly filled last block is copied on write when the next token lands in it), a parent picked by none is freed,
and the live beams of every prompt decode together in one batch.
"""
from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import dataclass

import torch

from fastgpt2.engine.outputs import CompletionOutput, RequestOutput
from fastgpt2.engine.sampling_params import SamplingParams
from fastgpt2.engine.scheduler import SchedulerOutput
from fastgpt2.engine.sequence import Sequence, SequenceStatus
from fastgpt2.engine.torch_threads import OneTorchThread

_NEG = -1.0e9  # transformers' stand-in for minus infinity: blocked candidates and empty finished slots


@dataclass(slots=True)
class BeamSearchParams:
    """Parameters of one beam_search call, with transformers' meanings."""

    beam_width: int = 4  # beams kept per prompt (num_beams)
    max_tokens: int = 16  # new tokens at most (max_new_tokens); the model's context also ends the search
    length_penalty: float = 1.0  # a finished beam scores cumulative_logprob / num_generated_tokens ** length_penalty
    early_stopping: bool | str = False  # True: stop once beam_width beams finished; False: heuristic; "never"
    ignore_eos: bool = False  # EOS is an ordinary token (transformers: eos_token_id=None)
    n: int = 1  # finished sequences returned per prompt, best first (num_return_sequences)

    def __post_init__(self):
        for name, lo in (("beam_width", 1), ("max_tokens", 1), ("n", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")
        if self.n > self.beam_width:
            raise ValueError(f"n must be at most beam_width ({self.beam_width}): a search keeps only beam_width "
                             f"finished sequences, got n={self.n}")
        lp = self.length_penalty
        if isinstance(lp, bool) or not isinstance(lp, (int, float)) or not math.isfinite(lp):
            raise ValueError(f"length_penalty must be a finite number, got {lp!r}")
        if self.early_stopping not in (True, False, "never") or not isinstance(self.early_stopping, (bool, str)):
            raise ValueError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be True or False, got {self.ignore_eos!r}")


@dataclass(slots=True)
class BeamCompletionOutput(CompletionOutput):
    score: float = 0.0  # what the beams are ranked by: cumulative_logprob / len(token_ids) ** length_penalty


class PromptBeams:
    """One prompt's search: its live beams (best first) and transformers' per-prompt state, in float32 as there."""

    def __init__(self, seq: Sequence, params: BeamSearchParams, max_length: int, eos_token_id: int | None,
                 device: torch.device):
        k = params.beam_width
        self.params = params
        self.prompt_len = seq.num_prompt_tokens
        self.max_length = max_length  # prompt + max_tokens, or the model's context
        self.eos = eos_token_id
        self.beams = [seq]  # transformers starts k copies, all but the first at -1e9: they are never picked
        self.running_scores = torch.zeros(1, device=device)  # cumulative logprob of each live beam
        self.finished_scores = torch.full((k,), _NEG, device=device)  # length-penalised; best first
        self.is_finished = torch.zeros(k, dtype=torch.bool, device=device)
        self.finished: list[tuple[list[int], float] | None] = [None] * k  # (token ids, cumulative logprob) per slot
        self.improvable = True  # transformers' is_early_stop_heuristic_unsatisfied
        self.done = False
        self.last_candidates: list[tuple[list[int], float]] = []  # the last step's best k (see outputs)

    def step(self, logprobs: torch.Tensor) -> list[tuple[int, int]]:
        """One step of transformers' _beam_search for this prompt.

        logprobs : (len(self.beams), vocab) float32, the log-softmax of each live beam's next-token logits.
        Returns the next beams as (index of the parent in self.beams, token), best first; [] once done.

        1. Candidates: the best 2k of (beam, token) by cumulative logprob. A candidate stops if its token is EOS or
           it reaches max_length. 2. The next beams: the best k candidates that did not stop. 3. Candidates among the
           first k that stopped join the k best finished ones, scored with the length penalty, unless the finished
           set is closed (early_stopping=True and k finished, or the heuristic says nothing can improve). 4. The
           search ends when nothing can improve, early_stopping=True and k finished, or every candidate stopped.
        """
        p, k = self.params, self.params.beam_width
        vocab_size = logprobs.shape[1]
        cur_len = self.beams[0].num_tokens
        scores = (logprobs + self.running_scores[:, None]).reshape(-1)
        top_scores, top_index = torch.topk(scores, 2 * k)
        parents, tokens = (top_index // vocab_size).tolist(), (top_index % vocab_size).tolist()
        hits = torch.tensor([t == self.eos or cur_len + 1 >= self.max_length for t in tokens], device=scores.device)
        # 2. The next running beams.
        running = top_scores + hits.to(torch.float32) * _NEG
        next_index = torch.topk(running, k).indices
        # 3. The finished set.
        just_finished = hits.clone()
        just_finished[k:] = False
        candidate = top_scores / ((cur_len + 1 - self.prompt_len) ** p.length_penalty)
        closed = bool(self.is_finished.all()) and p.early_stopping is True
        candidate += torch.tensor(closed).to(torch.float32) * _NEG
        candidate += torch.tensor(not self.improvable).to(torch.float32) * _NEG
        candidate += (~just_finished) * _NEG
        merged = torch.cat((self.finished_scores, candidate))
        keep = torch.topk(merged, k).indices
        entries = self.finished + [
            (self.beams[a].token_ids + [t], float(s)) if f else None
            for a, t, s, f in zip(parents, tokens, top_scores.tolist(), just_finished.tolist())]
        self.finished_scores = merged[keep]
        self.is_finished = torch.cat((self.is_finished, just_finished))[keep]
        self.finished = [entries[i] for i in keep.tolist()]
        # 4. Whether to go on: transformers' _check_early_stop_heuristic and _beam_search_has_unfinished_sequences.
        self.running_scores = running[next_index]
        cur_len += 1
        never = p.early_stopping == "never" and p.length_penalty > 0.0
        best_length = (self.max_length if never else cur_len) - self.prompt_len
        best_possible = self.running_scores[:1] / (best_length ** p.length_penalty)
        worst_finished = torch.where(self.is_finished, self.finished_scores.min(), _NEG)
        self.improvable = self.improvable and bool((best_possible > worst_finished).any())
        all_closed = bool(self.is_finished.all()) and p.early_stopping is True
        chosen = [(parents[j], tokens[j]) for j in next_index.tolist()]
        if self.improvable and not all_closed and not bool(hits.all()):
            # At most one EOS per beam among 2k candidates, so k of them always go on.
            assert not bool(hits[next_index].any()), "a stopped candidate was kept running"
            return chosen
        self.done = True
        self.last_candidates = [(self.beams[a].token_ids + [t], float(top_scores[j]))
                                for j, (a, t) in enumerate(zip(parents, tokens)) if j < k]
        return []

    def outputs(self, tokenizer) -> list[BeamCompletionOutput]:
        """The n best finished sequences, best first.

        transformers fills its k finished slots with -1e9 placeholders, which outrank a real sequence only when
        scores fall below -1e9 (a strongly negative length_penalty over long outputs); it then returns placeholders
        (the prompt padded). Here the missing ones come from the last step's best candidates, scored the same way."""
        p = self.params
        found = []  # (token ids, cumulative logprob, score)
        for entry, score, real in zip(self.finished, self.finished_scores.tolist(), self.is_finished.tolist()):
            if real and entry is not None:
                found.append((*entry, score))
        seen = {tuple(ids) for ids, _, _ in found}
        for ids, cumulative in self.last_candidates:
            if tuple(ids) not in seen:
                length = len(ids) - self.prompt_len
                found.append((ids, cumulative, float(torch.tensor(cumulative) / (length ** p.length_penalty))))
        outs = []
        for index, (ids, cumulative, score) in enumerate(found[:p.n]):
            gen = ids[self.prompt_len:]
            stop = self.eos is not None and gen[-1] == self.eos  # EOS ends the text and is not part of it
            outs.append(BeamCompletionOutput(index, tokenizer.decode(gen[:-1] if stop else gen), gen,
                                             "stop" if stop else "length", cumulative, None, score))
        return outs


@torch.inference_mode()
def beam_search(engine, prompts: list, params: BeamSearchParams) -> list[RequestOutput]:
    """Beam search for every prompt at once; one RequestOutput per prompt, in input order, holding its params.n best
    finished sequences (BeamCompletionOutput: token ids, text, finish_reason, cumulative_logprob, score).

    Needs an idle engine. Prompts are prefilled through the scheduler (chunked prefill, prefix cache, preemption of
    prompts still being prefilled); the beams then decode outside it, all prompts' beams in one batch per step (split
    by max_num_seqs). Running out of KV blocks while beams decode raises a RuntimeError naming kv_cache_memory. Every
    block is freed at the end, also when anything raises."""
    if engine.has_unfinished():
        raise ValueError("beam_search needs an idle engine: finish or abort the requests in flight first")
    if 2 * params.beam_width > engine.vocab_size:
        raise ValueError(f"beam_width must be at most {engine.vocab_size // 2} (half the vocabulary: each step "
                         f"ranks 2 * beam_width candidates), got {params.beam_width}")
    seq_params = SamplingParams(max_tokens=params.max_tokens, ignore_eos=params.ignore_eos)
    encoded = [engine.check_request(prompt, seq_params)[:2] for prompt in prompts]
    if not encoded:
        return []
    arrival = time.perf_counter()
    eos = None if params.ignore_eos else engine.tokenizer.eos_token_id
    n_ctx = engine.config.n_positions
    seqs = [Sequence(f"beam-{i}", ids, seq_params) for i, (_, ids) in enumerate(encoded)]
    searches = [PromptBeams(seq, params, min(seq.num_tokens + params.max_tokens, n_ctx), eos, engine.runner.device)
                for seq in seqs]
    live = set(seqs)  # every Sequence holding blocks or queued: all freed in the end, whatever happens
    finish_times: dict[int, float] = {}
    try:
        logits = _prefill(engine, seqs)
        first_token = time.perf_counter()
        active = searches
        while active:
            with OneTorchThread(logits.device):  # the step's torch work on one thread (see OneTorchThread)
                logprobs = torch.log_softmax(logits[:, :engine.vocab_size], dim=-1)  # never a padding id
                steps, row = [], 0
                for search in active:
                    num_beams = len(search.beams)
                    steps.append(search.step(logprobs[row:row + num_beams]))
                    row += num_beams
            for search, chosen in zip(active, steps):
                if search.done:
                    for seq in search.beams:
                        _release(engine, seq, live)
                    search.beams = []
                    finish_times[id(search)] = time.perf_counter()
                else:
                    _reform(engine, search, chosen, live)
            active = [s for s in active if not s.done]
            if active:
                logits = _decode(engine, [seq for s in active for seq in s.beams])
    finally:
        for seq in list(live):
            _release(engine, seq, live)
    results = []
    for (text, ids), seq, search in zip(encoded, seqs, searches):
        metrics = {"arrival": arrival, "first_token": first_token, "finish": finish_times[id(search)],
                   "num_preemptions": seq.num_preemptions}
        results.append(RequestOutput(seq.request_id, text, ids, search.outputs(engine.tokenizer), True, metrics))
    return results


def _prefill(engine, seqs: list[Sequence]) -> torch.Tensor:
    """Run every prompt through the scheduler; returns the logits at each prompt's last position, (len(seqs), vocab)
    float32. A prompt whose prefill is done leaves the scheduler's running list: its beams decode outside it."""
    scheduler, bm = engine.scheduler, engine.block_manager
    for seq in seqs:
        scheduler.add(seq)
    rows: dict[int, torch.Tensor] = {}
    while len(rows) < len(seqs):
        sched = scheduler.schedule()
        if sched.is_empty:
            raise _out_of_blocks(engine, "prefilling the prompts")
        sample_mask = [s.num_computed_tokens + n == s.num_tokens for s, n in zip(sched.seqs, sched.num_new_tokens)]
        logits = engine.runner.run(sched, sample_mask)
        row = 0
        for seq, n, sample in zip(sched.seqs, sched.num_new_tokens, sample_mask):
            seq.num_computed_tokens += n
            bm.commit(seq)
            if sample:
                rows[seq.seq_id] = logits[row]
                row += 1
                scheduler.running.remove(seq)
    return torch.stack([rows[seq.seq_id] for seq in seqs])


def _decode(engine, seqs: list[Sequence]) -> torch.Tensor:
    """One decode step of every live beam, in batches of at most max_num_seqs; logits (len(seqs), vocab)."""
    bm, scheduler = engine.block_manager, engine.scheduler
    batch = max(1, min(scheduler.max_num_seqs, scheduler.max_num_batched_tokens))
    out = []
    for start in range(0, len(seqs), batch):
        chunk = seqs[start:start + batch]
        copies = []
        for seq in chunk:
            if not bm.can_allocate(seq, 1):
                raise _out_of_blocks(engine, f"decoding {len(seqs)} beams")
            copies += bm.allocate(seq, 1)  # a shared, partly filled last block is copied on write here
        sched = SchedulerOutput(seqs=list(chunk), num_new_tokens=[1] * len(chunk), num_decodes=len(chunk),
                                block_copies=copies)
        out.append(engine.runner.run(sched, [True] * len(chunk)))
        for seq in chunk:
            seq.num_computed_tokens += 1
            bm.commit(seq)
    return out[0] if len(out) == 1 else torch.cat(out)


def _reform(engine, search: PromptBeams, chosen: list[tuple[int, int]], live: set) -> None:
    """The next beams from (parent index, token) pairs: a parent picked c times forks c - 1 children sharing its
    blocks (before anyone appends), a parent not picked is freed; then each beam appends its token."""
    picks = defaultdict(list)
    for j, (parent, _) in enumerate(chosen):
        picks[parent].append(j)
    beams: list[Sequence | None] = [None] * len(chosen)
    for i, seq in enumerate(search.beams):
        slots = picks.get(i)
        if not slots:
            _release(engine, seq, live)
            continue
        beams[slots[0]] = seq
        for j in slots[1:]:
            child = Sequence(seq.request_id, seq.token_ids, seq.params)
            child.num_prompt_tokens = seq.num_prompt_tokens
            child.status = SequenceStatus.RUNNING
            live.add(child)
            engine.block_manager.fork(seq, child)
            beams[j] = child
    for seq, (_, token) in zip(beams, chosen):
        seq.token_ids.append(token)
    search.beams = beams


def _release(engine, seq: Sequence, live: set) -> None:
    """Free seq's blocks wherever it is (the scheduler's queues, or decoding outside them)."""
    live.discard(seq)
    engine.scheduler.finish(seq, "abort")


def _out_of_blocks(engine, doing: str) -> RuntimeError:
    bm = engine.block_manager
    return RuntimeError(f"beam search ran out of KV blocks while {doing} ({bm.num_blocks} blocks of "
                        f"{bm.block_size} tokens, {bm.num_blocks * engine.bytes_per_block:,} bytes); raise "
                        f"kv_cache_memory, or lower beam_width or the number of prompts per call")
