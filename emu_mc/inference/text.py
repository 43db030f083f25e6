"""Text generation: one loop, logits processors, and a strategy that picks the next tokens
(greedy / sampling: `TokenPicker`; beam search: `BeamSearch`), as HF `generate` does.

Each step: logits of the newest position -> processors (repetition penalty, suppressed tokens, end of
sequence held back before min_new_tokens) -> the strategy picks the next token of every row (and, for
beams, which row each continues) -> the session reorders its rows and feeds the new tokens.
Never generated in text: bos, pad, the image tokens [IMG], <image>, [/IMG] and the chat turn tokens
[USER], [ASSISTANT] (they are never text targets in training, docs/model.md, "The objective, position
by position"; docs/chat_data.md). A chat answer ends at </s>, the end of the assistant's turn.

Shapes: B requests, K beams, N = B x K rows, V vocabulary.
"""
from dataclasses import dataclass
from typing import List, Optional

import torch

from emu_mc.inference.loading import LoadedEmu
from emu_mc.inference.prompts import PromptBuilder, Request
from emu_mc.inference.session import LLMSession, lm_logits, token_inputs
from emu_mc.inference.settings import GenerationInputError, TextSettings
from emu_mc.tokenizer import SpecialTokenIds


@dataclass
class TextResult:
    tokens: List[int]  # generated ids, the end of sequence included when reached
    text: str  # special tokens skipped
    finish_reason: str  # "eos" or "length"
    score: Optional[float] = None  # beam search: sum of log-probs / length ** length_penalty


def suppressed_ids(ids: SpecialTokenIds) -> List[int]:
    return [i for i in (ids.bos, ids.pad, ids.img_begin, ids.img_slot, ids.img_end, ids.user, ids.assistant)
            if i is not None]


def process_logits(logits: torch.Tensor, seen: torch.Tensor, step: int, settings: TextSettings,
                   ids: SpecialTokenIds) -> torch.Tensor:
    """logits [N, V] fp32, seen [N, V] bool (tokens already in each row) -> processed logits [N, V]."""
    if settings.repetition_penalty != 1.0:
        penalised = torch.where(logits > 0, logits / settings.repetition_penalty, logits * settings.repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    banned = suppressed_ids(ids) + ([ids.eos] if step < settings.min_new_tokens else [])
    logits = logits.clone()
    logits[:, banned] = float("-inf")
    return logits


def sampling_warp(logits: torch.Tensor, settings: TextSettings) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus: the smallest set of tokens whose probability
    reaches top_p, the most likely token always kept): logits [N, V] -> logits [N, V], -inf outside."""
    logits = logits / settings.temperature
    if settings.top_k > 0:
        kth = logits.topk(min(settings.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if settings.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        before = sorted_logits.softmax(-1).cumsum(-1) - sorted_logits.softmax(-1)  # mass of the better tokens
        drop_sorted = before >= settings.top_p
        logits = logits.masked_fill(drop_sorted.scatter(1, order, drop_sorted), float("-inf"))
    return logits


class TokenPicker:
    """Greedy (argmax) or sampling; rows that reached the end of sequence get pad from then on."""

    def __init__(self, settings: TextSettings, batch: int, ids: SpecialTokenIds, device):
        self.settings, self.ids = settings, ids
        self.rows = torch.arange(batch, device=device)  # no reordering
        self.done = torch.zeros(batch, dtype=torch.bool, device=device)
        self.generated: List[torch.Tensor] = []
        self.generator = None
        if settings.do_sample:
            self.generator = torch.Generator(device=device).manual_seed(settings.seed or 0)

    def step(self, logits: torch.Tensor) -> tuple:
        """logits [N, V] -> (next tokens [N], rows to continue [N] or None)."""
        if self.generator is None:
            tokens = logits.argmax(-1)
        else:
            probs = sampling_warp(logits, self.settings).softmax(-1)
            tokens = torch.multinomial(probs, 1, generator=self.generator).squeeze(1)
        tokens = tokens.masked_fill(self.done, self.ids.pad)
        self.done |= tokens == self.ids.eos
        self.generated.append(tokens)
        return tokens, None

    @property
    def finished(self) -> bool:
        return bool(self.done.all())

    def results(self) -> List[tuple]:
        """[(tokens, score None, reached eos)] per request."""
        out = []
        for row in torch.stack(self.generated, 1).tolist():
            reached = self.ids.eos in row
            out.append((row[:row.index(self.ids.eos) + 1] if reached else row, None, reached))
        return out


class BeamSearch:
    """K beams per request, scored by summed log-probs; a beam that ends in eos becomes a finished
    hypothesis with score sum / length ** length_penalty (length = its new tokens, eos included). A
    request is done when it has K hypotheses and its best live beam cannot beat the worst of them
    (HF's early_stopping=False rule); at max_new_tokens the live beams join the hypotheses."""

    def __init__(self, settings: TextSettings, batch: int, ids: SpecialTokenIds, device):
        k = settings.num_beams
        self.k, self.batch, self.ids, self.lp = k, batch, ids, settings.length_penalty
        self.rows = torch.arange(batch, device=device).repeat_interleave(k)  # expand each prompt to K rows
        self.scores = torch.full((batch, k), float("-inf"), device=device)
        self.scores[:, 0] = 0.0  # one live beam at first, so the K beams do not repeat each other
        self.sequences = torch.zeros(batch * k, 0, dtype=torch.long, device=device)
        self.hypotheses: List[List[tuple]] = [[] for _ in range(batch)]  # (score, sum_logprobs, tokens)
        self.done = [False] * batch

    def _add(self, b: int, tokens: List[int], sum_logprobs: float) -> None:
        hyps = self.hypotheses[b]
        hyps.append((sum_logprobs / len(tokens) ** self.lp, sum_logprobs, tokens))
        hyps.sort(key=lambda h: h[0], reverse=True)
        del hyps[self.k:]

    def step(self, logits: torch.Tensor) -> tuple:
        k, vocab = self.k, logits.shape[-1]
        logprobs = logits.log_softmax(-1)  # [N, V]
        candidates = (self.scores.reshape(-1, 1) + logprobs).reshape(self.batch, k * vocab)
        top, index = candidates.topk(2 * k, dim=1)
        beam, token = (index // vocab).tolist(), (index % vocab).tolist()
        top = top.tolist()
        new_scores = self.scores.clone()
        new_tokens = torch.full((self.batch, k), self.ids.pad, dtype=torch.long)
        new_beams = torch.arange(k).repeat(self.batch, 1)
        length = self.sequences.shape[1] + 1
        for b in range(self.batch):
            if self.done[b]:
                continue
            live = 0
            for rank in range(2 * k):
                if top[b][rank] == float("-inf"):
                    break
                if token[b][rank] == self.ids.eos:
                    if rank < k:
                        self._add(b, self.sequences[b * k + beam[b][rank]].tolist() + [self.ids.eos], top[b][rank])
                    continue
                new_scores[b, live], new_tokens[b, live] = top[b][rank], token[b][rank]
                new_beams[b, live] = beam[b][rank]
                live += 1
                if live == k:
                    break
            new_scores[b, live:] = float("-inf")
            best_live = float(new_scores[b].max()) / length ** self.lp
            self.done[b] = len(self.hypotheses[b]) == k and best_live <= self.hypotheses[b][-1][0]
        rows = (torch.arange(self.batch)[:, None] * k + new_beams).reshape(-1).to(self.sequences.device)
        new_tokens = new_tokens.reshape(-1).to(self.sequences.device)
        self.sequences = torch.cat([self.sequences.index_select(0, rows), new_tokens[:, None]], 1)
        self.scores = new_scores
        return new_tokens, rows

    @property
    def finished(self) -> bool:
        return all(self.done)

    def results(self) -> List[tuple]:
        out = []
        for b in range(self.batch):
            if not self.done[b]:
                for j in range(self.k):
                    if self.scores[b, j] > float("-inf"):
                        self._add(b, self.sequences[b * self.k + j].tolist(), float(self.scores[b, j]))
            score, _, tokens = self.hypotheses[b][0]
            out.append((tokens, score, tokens[-1] == self.ids.eos))
        return out


def generate_text(emu: LoadedEmu, requests: List[Request], settings: TextSettings = None) -> List[TextResult]:
    """Continue each request's prompt (text, images, videos) with text; one batch, left-padded.
    Greedy or sampling with num_beams 1, beam search otherwise."""
    settings = (settings or TextSettings()).validate()
    return decode(emu, requests, settings, BeamSearch if settings.num_beams > 1 else TokenPicker)


@torch.no_grad()
def decode(emu: LoadedEmu, requests: List[Request], settings: TextSettings, strategy_cls) -> List[TextResult]:
    """The generation loop, for any strategy class (TokenPicker, BeamSearch)."""
    model, ids, device = emu.model, emu.ids, emu.device
    positions = emu.cfg.model.llm.max_position_embeddings
    batch = PromptBuilder(emu.cfg, emu.tokenizer, ids, emu.cfg.model.vision.image_size).batch(
        requests, positions - 1).to(device)
    max_new = min(settings.max_new_tokens, positions - batch.input_ids.shape[1])
    if max_new < settings.min_new_tokens:
        raise GenerationInputError(f"min_new_tokens {settings.min_new_tokens}: only {max_new} positions are left "
                                   f"after the prompt (model.llm.max_position_embeddings {positions})")
    n = len(requests)
    strategy = strategy_cls(settings, n, ids, device)
    session = LLMSession(model.llm, n, batch.input_ids.shape[1] + max_new, use_cache=settings.use_cache)
    hidden = session.feed(model.embed(batch), batch.segment_ids >= 0)[-1]
    session.reorder(strategy.rows)
    hidden = hidden.index_select(0, strategy.rows)
    seen = torch.zeros(len(strategy.rows), model.vocab_size, dtype=torch.bool, device=device)
    seen.scatter_(1, batch.input_ids.index_select(0, strategy.rows), True)
    for step in range(max_new):
        logits = process_logits(lm_logits(model, hidden), seen, step, settings, ids)
        tokens, rows = strategy.step(logits)
        if rows is not None:
            session.reorder(rows)
            seen = seen.index_select(0, rows)
        seen[torch.arange(len(tokens), device=device), tokens] = True
        if strategy.finished or step + 1 == max_new:
            break
        new = tokens[:, None]
        hidden = session.feed(token_inputs(model, new), torch.ones_like(new, dtype=torch.bool))[-1]
    return [TextResult(tokens, emu.tokenizer.decode(tokens, skip_special_tokens=True), "eos" if eos else "length",
                       score) for tokens, score, eos in strategy.results()]
