"""ModelRunner: the one place that turns a scheduled batch into the model's inputs (tensors, or numpy arrays for the
C++ CPU step) and runs the model over the paged KV cache."""
from __future__ import annotations

import numpy as np
import torch

from fastgpt2.model.attention import AttentionMetadata
from fastgpt2.engine.cuda_graphs import DecodeGraphs
from fastgpt2.model.gpt2 import GPT2
from fastgpt2.engine.cpu_step import CpuStep
from fastgpt2.engine.host_memory import zeros_on_huge_pages
from fastgpt2.engine.scheduler import SchedulerOutput
from fastgpt2.engine.torch_threads import OneTorchThread


def kv_bytes_per_block(model: GPT2, block_size: int) -> int:
    c = model.config
    return 2 * c.n_layer * block_size * c.n_embd * model.wte.weight.element_size()


class ModelRunner:
    def __init__(self, model: GPT2, num_blocks: int, block_size: int, max_num_seqs: int = 256,
                 use_cuda_graphs: bool = True):
        self.model = model
        self.block_size = block_size
        self.num_blocks = num_blocks
        c = model.config
        self.device = model.wte.weight.device
        # One pool for every layer: (n_layer, 2, num_blocks, block_size, n_head, head_dim). Zero-filled so that the
        # padding a gather may read past a sequence's end is never NaN. On CPU on huge pages (host_memory.py).
        shape = (c.n_layer, 2, num_blocks, block_size, c.n_head, c.head_dim)
        dtype = model.wte.weight.dtype
        self.kv_cache = (zeros_on_huge_pages(shape, dtype) if self.device.type == "cpu"
                         else torch.zeros(shape, dtype=dtype, device=self.device))
        self.kv_caches = [(self.kv_cache[i, 0], self.kv_cache[i, 1]) for i in range(c.n_layer)]
        self.scale = 1.0 / c.head_dim ** 0.5
        # On CPU (float32, extension built, not turned off) every step runs the C++ step: bitwise batch-invariant.
        self.cpu_step = CpuStep(model, self.kv_cache) if CpuStep.supports(model, self.kv_cache) else None
        # On CUDA, decode-only steps replay graphs captured per batch-size rung (see cuda_graphs.py).
        self.decode_graphs = None
        if use_cuda_graphs and self.device.type == "cuda":
            self.decode_graphs = DecodeGraphs(model, self.kv_caches, block_size, max_num_seqs, self.scale)

    @property
    def fuses_greedy(self) -> bool:
        """Whether run() can return greedy tokens picked inside the step (greedy_limit) instead of the logits."""
        return self.cpu_step is not None

    def refresh_weights(self) -> None:
        """After the model's parameters were overwritten in place: rebuild the C++ step (it keeps packed copies of the
        weight matrices) and drop the model's transposed-head cache. CUDA graphs read the parameters in place."""
        self.model._wte_t_cache = None
        if self.cpu_step is not None:
            self.cpu_step = CpuStep(self.model, self.kv_cache)

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        if copies:
            # One torch thread on the CPU: the C++ step follows at once, and OpenMP's threads would spin into it.
            with OneTorchThread(self.device):
                src = torch.tensor([s for s, _ in copies], device=self.device)
                dst = torch.tensor([d for _, d in copies], device=self.device)
                self.kv_cache[:, :, dst] = self.kv_cache[:, :, src]

    def _step_lists(self, sched: SchedulerOutput, sample_mask: list[bool], prompt_rows: list[range] | None):
        """The step as Python lists: packed token ids, positions and KV slots (N,), each token's sequence index (N,),
        the packed index of each row whose logits are wanted (the sampled rows, then the prompt_rows (per sequence,
        positions of its chunk) in order), each sequence's query length and context length, and its block table."""
        bs = self.block_size
        token_ids, positions, slots, logits_indices, prompt_indices, seq_index = [], [], [], [], [], []
        q_lens, seq_lens, tables = [], [], []
        for i, (seq, n, sample) in enumerate(zip(sched.seqs, sched.num_new_tokens, sample_mask)):
            start = seq.num_computed_tokens
            if prompt_rows is not None:
                prompt_indices.extend(len(token_ids) - start + p for p in prompt_rows[i])
            token_ids.extend(seq.token_ids[start:start + n])
            positions.extend(range(start, start + n))
            seq_index.extend([i] * n)
            table = seq.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, start + n))
            if sample:
                logits_indices.append(len(token_ids) - 1)
            q_lens.append(n)
            seq_lens.append(start + n)
            tables.append(table)
        return token_ids, positions, slots, seq_index, logits_indices + prompt_indices, q_lens, seq_lens, tables

    @staticmethod
    def _padded_tables(tables: list[list[int]]) -> list[list[int]]:
        max_blocks = max(len(t) for t in tables)
        return [t + [0] * (max_blocks - len(t)) for t in tables]

    def prepare(self, sched: SchedulerOutput, sample_mask: list[bool], prompt_rows: list[range] | None = None):
        """Packed token ids (N,), positions (N,), attention metadata, the packed index of each row whose logits are
        wanted (the sampled rows, then the prompt_rows (per sequence, positions of its chunk) in order), and each
        token's sequence index (N,) int32 into meta's block tables (decodes' rows, then prefills')."""
        token_ids, positions, slots, seq_index, rows, q_lens, seq_lens, tables = self._step_lists(
            sched, sample_mask, prompt_rows)
        nd = sched.num_decodes
        dev = self.device
        table_tensor = torch.tensor(self._padded_tables(tables), dtype=torch.int32, device=dev)
        seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32, device=dev)
        cu = [0]
        for n in q_lens[nd:]:
            cu.append(cu[-1] + n)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            num_decode_tokens=nd,
            decode_block_tables=table_tensor[:nd],
            decode_seq_lens=seq_lens_t[:nd],
            prefill_cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=dev),
            prefill_seq_lens=seq_lens_t[nd:],
            prefill_block_tables=table_tensor[nd:],
            num_prefills=len(q_lens) - nd,
            prefill_max_query_len=max(q_lens[nd:], default=0),
            scale=self.scale,
        )
        ids = torch.tensor(token_ids, dtype=torch.long, device=dev)
        pos = torch.tensor(positions, dtype=torch.long, device=dev)
        return (ids, pos, meta, torch.tensor(rows, dtype=torch.long, device=dev),
                torch.tensor(seq_index, dtype=torch.int32, device=dev), table_tensor)

    def prepare_cpu(self, sched: SchedulerOutput, sample_mask: list[bool], prompt_rows: list[range] | None = None):
        """The C++ step's inputs as numpy arrays (CpuStep.run_arrays), with no torch operation: token ids, positions,
        slots (N,) int64, sequence index (N,) int32, block tables (S, max_blocks) int32, logits rows (R,) int64."""
        token_ids, positions, slots, seq_index, rows, _, _, tables = self._step_lists(sched, sample_mask, prompt_rows)
        return (np.array(token_ids, dtype=np.int64), np.array(positions, dtype=np.int64),
                np.array(slots, dtype=np.int64), np.array(seq_index, dtype=np.int32),
                np.array(self._padded_tables(tables), dtype=np.int32), np.array(rows, dtype=np.int64))

    def run(self, sched: SchedulerOutput, sample_mask: list[bool], prompt_rows: list[range] | None = None,
            greedy_limit: int | None = None) -> torch.Tensor | None:
        """Run one step; returns float32 logits (num_sampled + num_prompt_rows, vocab): the rows in sample_mask,
        then those of prompt_rows (see prepare); None when there are none. greedy_limit (the C++ step only, see
        fuses_greedy): the sampled rows' greedy tokens (num_sampled,) int64 instead, each the argmax over ids
        [0, greedy_limit) of the logits it would have returned."""
        self.copy_blocks(sched.block_copies)
        if self.cpu_step is not None:  # every CPU step: prefill chunks, decodes, prompt-logprob rows
            out = self.cpu_step.run_arrays(*self.prepare_cpu(sched, sample_mask, prompt_rows), greedy_limit)
            return out if len(out) else None
        if greedy_limit is not None:
            raise ValueError("greedy_limit needs the C++ CPU step (ModelRunner.fuses_greedy)")
        return self._run_torch(sched, sample_mask, prompt_rows)

    @torch.inference_mode()
    def _run_torch(self, sched: SchedulerOutput, sample_mask: list[bool], prompt_rows: list[range] | None):
        """run() with the torch model (CUDA, or a CPU without the C++ step)."""
        ids, pos, meta, logits_indices, seq_index, tables = self.prepare(sched, sample_mask, prompt_rows)
        # On CUDA, a step of decodes only, each sampled, replays a captured graph when it fits.
        decode_only = (meta.num_prefills == 0 and len(logits_indices) == meta.num_decode_tokens
                       and not any(prompt_rows or ()))
        graphs = self.decode_graphs
        if graphs is not None and decode_only and meta.num_decode_tokens <= graphs.max_batch_size:
            logits = graphs(ids, pos, meta.slot_mapping, meta.decode_block_tables, meta.decode_seq_lens)
            return logits.float()
        logits = self.model.forward_paged(ids, pos, meta, self.kv_caches, logits_indices)
        return logits.float() if len(logits_indices) else None
