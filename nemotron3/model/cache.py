"""HybridCache: the recurrent state a Nemotron-H model carries between forward calls.

Per sequence slot it holds, for every Mamba layer, the causal-conv window (the last `conv_kernel - 1`
inputs of `xBC`, as the causal_conv1d kernels keep it) and the SSM state [H, P, N] in
`mamba_ssm_cache_dtype` (fp32); for every attention layer (the MTP block's included) a K/V buffer that
grows with the sequence. Mamba memory is constant in the sequence length; only the few attention layers
with their 2 KV heads grow.

A forward call processes `T` new tokens for each of `B` rows; row `b` continues slot `slots[b]` from
`lengths[slots[b]]`, so rows may sit at different positions (continuous batching). The model reads and
writes the slots in place and advances `lengths` at the end of the call. Rolling back (speculative
decoding) is setting `lengths` for attention (K/V past a row's length is masked, then overwritten) and,
for Mamba, keeping the state recorded after the last accepted position: a forward with
`record_states=True` leaves every position's conv window and SSM state in `recorded`, and
`keep_recorded(slots, index)` installs the chosen one per row.

A slot's whole state at some length (Mamba states + K/V up to that length, the MTP block's K/V up to
its own length) can be copied out (`snapshot`), put back into any slot (`restore`) or copied between
slots (`copy_slot`): the engine's prefix cache and slot compaction are built on these.

K/V storage (`kv_dtype`) may differ from the activation dtype: `bfloat16`, or FP8 E4M3 as NVIDIA's NVFP4
checkpoints declare (`kv_cache_quant_algo: "FP8"`) and vLLM stores it: quantize on write
(`k / k_scale`, saturated to +-448), dequantize on read (`* k_scale`), one fp32 scale per layer for K and one for
V (the checkpoint's `...k_proj.k_scale` / `...v_proj.v_scale`, 1.0 when absent). The scales are constants of
the cache, so snapshots, slot copies and rollbacks move the stored bytes unchanged. `HybridCache.for_model`
resolves vLLM's `kv_cache_dtype` flag (`auto` = what the checkpoint declares, else the activation dtype).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..config import NemotronConfig

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
KV_CACHE_DTYPES = ("auto", "bfloat16", "fp8")        # vLLM's --kv-cache-dtype spellings we support
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


class HybridCache:
    def __init__(self, config: NemotronConfig, num_slots: int = 1, max_len: int = 256,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 kv_dtype: torch.dtype | None = None, kv_scales: dict[int, tuple[float, float]] | None = None):
        """`dtype`: activations (conv state, K/V as attention reads them); `kv_dtype`: K/V storage (default
        `dtype`); `kv_scales`: {attention cache index: (k_scale, v_scale)} for FP8 storage (1.0 when absent)."""
        self.config = config
        self.num_slots = num_slots
        self.dtype = dtype
        self.kv_dtype = kv_dtype or dtype
        self.device = torch.device(device)
        c = config
        ssm_dtype = _DTYPES[c.mamba_ssm_cache_dtype]
        # Positions live on the host: they drive Python-side indexing. The MTP block's attention runs one
        # token behind the backbone (it sees the embedding of the *next* token), so it keeps its own count.
        self.lengths = torch.zeros(num_slots, dtype=torch.long)
        self.mtp_lengths = torch.zeros(num_slots, dtype=torch.long)
        self.conv: dict[int, torch.Tensor] = {}
        self.ssm: dict[int, torch.Tensor] = {}
        # per-position (conv [B, T, C, K-1], ssm [B, T, H, P, N]) of the last `record_states` forward
        self.recorded: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        # K/V buffers grow by doubling but never past this many positions (the engine sets max_model_len
        # + drafts), so a 128K context does not reserve 256K; None = unbounded doubling
        self.capacity_limit: int | None = None
        for i, kind in self._layers():
            if kind == "M":
                self.conv[i] = torch.zeros(num_slots, c.mamba_conv_dim, c.conv_kernel - 1, dtype=dtype, device=device)
                self.ssm[i] = torch.zeros(num_slots, c.mamba_num_heads, c.mamba_head_dim, c.ssm_state_size,
                                          dtype=ssm_dtype, device=device)
            elif kind == "*":
                shape = (num_slots, c.num_key_value_heads, max(1, max_len), c.head_dim)
                self.k[i] = torch.zeros(shape, dtype=self.kv_dtype, device=device)
                self.v[i] = torch.zeros(shape, dtype=self.kv_dtype, device=device)
        scales = kv_scales or {}
        self.kv_scales = {i: tuple(float(s) for s in scales.get(i, (1.0, 1.0))) for i in self.k}
        bad = {i: s for i, s in self.kv_scales.items() if not all(math.isfinite(x) and x > 0 for x in s)}
        if bad:
            raise ValueError(f"K/V scales must be finite and > 0, got {bad}")

    @classmethod
    def for_model(cls, model, num_slots: int = 1, max_len: int = 256, kv_cache_dtype: str = "auto") -> "HybridCache":
        """A cache for `model` (its dtype and device). `kv_cache_dtype` (vLLM's flag): "auto" = FP8 when the
        model's attention layers carry K/V scales (a checkpoint declaring `kv_cache_quant_algo: FP8`), else the
        model dtype; "bfloat16"; "fp8" (the model's scales, 1.0 where it has none)."""
        if kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"unknown kv_cache_dtype {kv_cache_dtype!r}; use one of {', '.join(KV_CACHE_DTYPES)}")
        n = model.config.num_hidden_layers
        attn = {i: b.mixer for i, b in enumerate(model.backbone.layers) if b.kind == "*"}
        if model.mtp is not None:
            attn.update({n + j: b.mixer for j, b in enumerate(model.mtp.layers) if b.kind == "*"})
        declared = any(m.k_scale is not None for m in attn.values())
        kv = {"auto": FP8 if declared else None, "bfloat16": torch.bfloat16, "fp8": FP8}[kv_cache_dtype]
        scales = {i: (1.0 if m.k_scale is None else m.k_scale, 1.0 if m.v_scale is None else m.v_scale)
                  for i, m in attn.items()} if kv == FP8 else None
        return cls(model.config, num_slots, max_len, dtype=model.dtype, device=model.device, kv_dtype=kv,
                   kv_scales=scales)

    def kv_store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """New K/V as stored: cast to `kv_dtype`, FP8 quantized as `x / scale` saturated to +-448."""
        if self.kv_dtype != FP8:
            return k.to(self.kv_dtype), v.to(self.kv_dtype)
        ks, vs = self.kv_scales[layer]
        return ((k.float() / ks).clamp_(-FP8_MAX, FP8_MAX).to(FP8),
                (v.float() / vs).clamp_(-FP8_MAX, FP8_MAX).to(FP8))

    def kv_load(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stored K/V as attention reads them: FP8 dequantized (`x * scale`) to the activation dtype."""
        if self.kv_dtype != FP8:
            return k, v
        ks, vs = self.kv_scales[layer]
        return k.to(self.dtype).mul_(ks), v.to(self.dtype).mul_(vs)

    def _layers(self):
        """(cache index, kind) for every stateful layer: the backbone's, then the MTP block's."""
        c = self.config
        yield from enumerate(c.pattern)
        if c.has_mtp:
            n = c.num_hidden_layers
            for j, kind in enumerate(c.mtp_pattern * c.num_nextn_predict_layers):
                yield n + j, kind

    # ---- per-call view ----
    def is_mtp_layer(self, layer: int) -> bool:
        return layer >= self.config.num_hidden_layers

    def rows(self, slots: torch.Tensor | None, batch: int, mtp: bool = False, record: bool = False) -> "CacheRows":
        if slots is None:
            if batch > self.num_slots:
                raise ValueError(f"batch of {batch} rows but the cache has {self.num_slots} slots")
            slots = torch.arange(batch)
        slots = torch.as_tensor(slots, dtype=torch.long).cpu()
        if slots.dim() != 1 or slots.numel() != batch:
            raise ValueError(f"{slots.numel()} slots given for a batch of {batch} rows")
        if batch and (int(slots.min()) < 0 or int(slots.max()) >= self.num_slots):
            raise ValueError(f"slots {slots.tolist()} out of range: the cache has slots 0..{self.num_slots - 1}")
        if batch > 1 and slots.unique().numel() != batch:
            raise ValueError(f"slots {slots.tolist()} repeat a slot: each row needs its own")
        if record:
            self.recorded = {}
        return CacheRows(self, slots, self.mtp_lengths if mtp else self.lengths, record)

    def reset(self, slots=None) -> None:
        """Forget the sequences in `slots` (all if None) so the slots can be reused."""
        idx = slice(None) if slots is None else torch.as_tensor(slots, dtype=torch.long)
        self.lengths[idx] = 0
        self.mtp_lengths[idx] = 0
        for t in (*self.conv.values(), *self.ssm.values()):
            t[idx] = 0

    def keep_recorded(self, slots, index) -> None:
        """After a `record_states` forward over `slots`: give row b's slot the Mamba state recorded after
        its token `index[b]` (speculative decoding: the last accepted position). Lengths are the caller's."""
        slots = torch.as_tensor(slots, dtype=torch.long)
        index = torch.as_tensor(index, dtype=torch.long)
        rows = torch.arange(len(slots))
        dev_slots = slots.to(self.device)
        for layer, (conv, ssm) in self.recorded.items():
            self.conv[layer][dev_slots] = conv[rows, index].to(self.conv[layer].dtype)
            self.ssm[layer][dev_slots] = ssm[rows, index].to(self.ssm[layer].dtype)
        self.recorded = {}

    def mtp_mamba_state(self, slots) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Copies of the MTP block's Mamba states (conv, ssm) of `slots` ({} when the MTP block has no
        Mamba layer): what the engine puts back after drafting appended temporary MTP entries."""
        idx = torch.as_tensor(slots, dtype=torch.long).to(self.device)
        return {i: (self.conv[i][idx].clone(), self.ssm[i][idx].clone()) for i in self.conv if self.is_mtp_layer(i)}

    def set_mtp_mamba_state(self, slots, state: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        idx = torch.as_tensor(slots, dtype=torch.long).to(self.device)
        for i, (conv, ssm) in state.items():
            self.conv[i][idx] = conv
            self.ssm[i][idx] = ssm

    # ---- whole-slot state: snapshot / restore / copy ----
    def snapshot(self, slot: int, length: int | None = None, mtp_length: int | None = None) -> "SlotState":
        """Copy of one slot's state: Mamba states as they are now, K/V of positions < `length` (default:
        the slot's length) and MTP K/V of positions < `mtp_length`."""
        n = int(self.lengths[slot]) if length is None else length
        m = int(self.mtp_lengths[slot]) if mtp_length is None else mtp_length
        st = SlotState(n, m)
        for i in self.conv:
            st.conv[i] = self.conv[i][slot].clone()
            st.ssm[i] = self.ssm[i][slot].clone()
        for i in self.k:
            upto = m if self.is_mtp_layer(i) else n
            st.k[i] = self.k[i][slot, :, :upto].clone()
            st.v[i] = self.v[i][slot, :, :upto].clone()
        return st

    def restore(self, slot: int, st: "SlotState") -> None:
        """Load a snapshot into `slot` (any slot of a cache with the same config) and set its lengths."""
        for i in self.k:
            self.ensure_capacity(st.mtp_length if self.is_mtp_layer(i) else st.length, i)
        for i in self.conv:
            self.conv[i][slot] = st.conv[i]
            self.ssm[i][slot] = st.ssm[i]
        for i in self.k:
            n = st.k[i].shape[1]
            self.k[i][slot, :, :n] = st.k[i]
            self.v[i][slot, :, :n] = st.v[i]
        self.lengths[slot] = st.length
        self.mtp_lengths[slot] = st.mtp_length

    def copy_slot(self, src: int, dst: int) -> None:
        """Make `dst` an exact copy of `src` (state, K/V up to its lengths, lengths)."""
        n, m = int(self.lengths[src]), int(self.mtp_lengths[src])
        for i in self.conv:
            self.conv[i][dst] = self.conv[i][src]
            self.ssm[i][dst] = self.ssm[i][src]
        for i in self.k:
            upto = m if self.is_mtp_layer(i) else n
            self.k[i][dst, :, :upto] = self.k[i][src, :, :upto]
            self.v[i][dst, :, :upto] = self.v[i][src, :, :upto]
        self.lengths[dst], self.mtp_lengths[dst] = n, m

    def slot_nbytes(self, length: int) -> dict:
        """Bytes one sequence of `length` tokens needs: Mamba state (constant) + K/V (linear in length)."""
        mamba = sum(t[0].numel() * t.element_size() for t in (*self.conv.values(), *self.ssm.values()))
        kv = sum(t.shape[1] * t.shape[3] * t.element_size() * length for t in (*self.k.values(), *self.v.values()))
        return {"mamba": mamba, "kv": kv, "total": mamba + kv}

    def ensure_capacity(self, needed: int, layer: int | None = None) -> None:
        """Grow the K/V buffers (doubling) so every slot can hold `needed` positions: one layer's (what a
        forward writes; the MTP block's buffers stay small when nothing drafts) or, by default, all."""
        for store in (self.k, self.v):
            for i, buf in store.items():
                if (layer is None or i == layer) and buf.shape[2] < needed:
                    size = max(needed, 2 * buf.shape[2])
                    if self.capacity_limit is not None:
                        size = max(needed, min(size, self.capacity_limit))
                    new = buf.new_zeros(buf.shape[0], buf.shape[1], size, buf.shape[3])
                    new[:, :, : buf.shape[2]] = buf
                    store[i] = new

    def nbytes(self) -> dict:
        """Bytes held now: Mamba state (constant) and K/V buffers (allocated capacity)."""
        mamba = sum(t.numel() * t.element_size() for t in (*self.conv.values(), *self.ssm.values()))
        kv = sum(t.numel() * t.element_size() for t in (*self.k.values(), *self.v.values()))
        return {"mamba": mamba, "kv": kv, "total": mamba + kv}


@dataclass
class SlotState:
    """One sequence's cached state at `length` tokens (see `HybridCache.snapshot`)."""
    length: int
    mtp_length: int
    conv: dict = field(default_factory=dict)
    ssm: dict = field(default_factory=dict)
    k: dict = field(default_factory=dict)
    v: dict = field(default_factory=dict)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self.conv, self.ssm, self.k, self.v) for t in d.values())


@dataclass(frozen=True)
class PrefixCausal:
    """Mask marker from `CacheRows.append_kv`: every row's queries are the `prefix`-th.. positions, so query
    i sees all `prefix` cached keys and the new keys j <= i (a bottom-right-aligned causal mask)."""
    prefix: int


class CacheRows:
    """The slots one forward call touches; each layer gathers its rows and scatters them back. Slots that
    form an ascending run (`a, a+1, ...`) are read and written through views, without gathers."""

    def __init__(self, cache: HybridCache, slots: torch.Tensor, lengths: torch.Tensor, record: bool = False):
        self.cache = cache
        self.slots = slots
        self.lengths = lengths
        self.record = record
        self.start = lengths[slots]                          # [B] position of the first new token
        n = len(slots)
        first = int(slots[0]) if n else 0
        self._contig = bool(n and torch.equal(slots, torch.arange(first, first + n)))
        self._idx = slice(first, first + n) if self._contig else slots.to(cache.device)

    def get_mamba(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.cache
        return c.conv[layer][self._idx], c.ssm[layer][self._idx]

    def set_mamba(self, layer: int, conv: torch.Tensor, ssm: torch.Tensor) -> None:
        """Store the new state; in record mode the states are per position and the last one is stored."""
        c = self.cache
        if self.record:
            c.recorded[layer] = (conv, ssm)
            conv, ssm = conv[:, -1], ssm[:, -1]
        for store, new in ((c.conv[layer], conv), (c.ssm[layer], ssm)):
            dest = store[self._idx]
            if not (self._contig and new.data_ptr() == dest.data_ptr() and new.stride() == dest.stride()):
                store[self._idx] = new.to(store.dtype)          # (updated in place already: nothing to copy)

    def append_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v [B, n_kv, T, hd] at each row's position; return all keys/values of the rows
        [B, n_kv, S, hd] and the mask: None (plain causal from position 0, or T = 1), `PrefixCausal(start)`
        when all rows start at the same position (chunked prefill), else a bool mask [B, 1, T, S]
        (query i of row b sees keys j <= start_b + i)."""
        c = self.cache
        B, _, T, _ = k.shape
        end = int(self.start.max()) + T
        c.ensure_capacity(end, layer)
        kb, vb = c.k[layer], c.v[layer]
        k, v = c.kv_store(layer, k, v)
        uniform = bool((self.start == self.start[0]).all())
        if uniform:
            s = int(self.start[0])
            kb[self._idx, :, s:s + T] = k
            vb[self._idx, :, s:s + T] = v
        else:
            pos = (self.start[:, None] + torch.arange(T)).to(c.device)          # [B, T]
            rows = self.slots.to(c.device)[:, None]
            kb[rows, :, pos] = k.transpose(1, 2)                                 # indexed view is [B, T, n_kv, hd]
            vb[rows, :, pos] = v.transpose(1, 2)
        keys, values = c.kv_load(layer, kb[self._idx, :, :end], vb[self._idx, :, :end])
        if uniform and (int(self.start[0]) == 0 or T == 1):
            return keys, values, None          # plain causal prefill, or one query that sees every key
        if uniform:
            # chunked prefill (all rows at the same position): causal within the chunk, every cached key
            # visible; `Attention` computes it without a [T, S] mask (see `PrefixCausal`)
            return keys, values, PrefixCausal(int(self.start[0]))
        q_pos = (self.start[:, None] + torch.arange(T))[:, None, :, None]          # [B,1,T,1]
        mask = torch.arange(end)[None, None, None, :] <= q_pos
        return keys, values, mask.to(c.device)

    def advance(self, n: int) -> None:
        self.lengths[self.slots] += n
