"""Lexically constrained beam search: phrases each translation must contain, and phrases it must not (terminology).

transformers 5 removed constrained beam search (`constraints=`, `force_words_ids=`) from `generate()`. This is a
`custom_generate` decoding method in its place: `model.generate(**batch, num_beams=4, constraints=[...])` on an
hf_attention model calls it (or pass `custom_generate=constrained_beam_search` to any encoder-decoder's `generate`),
with one `LexicalConstraints` per source sentence.

The search is dynamic beam allocation (Post & Vilar, 2018), in the vectorised ranking of Hu et al. (2019):

- each step's candidates are, for every source, the best continuations over its whole beam, each hypothesis's own
  best next token, and every hypothesis's next constraint token (the next token of a phrase it has begun, or the
  first token of each phrase it has not met);
- a candidate's *bank* is the number of constraint tokens it has met; candidates are ranked by score inside their
  bank and the beam takes rank 0 of every bank (fullest bank first), then rank 1, ..., so the beam is shared among
  the banks and does not grow with the number of constraints;
- a hypothesis may end only when it has met every constraint; one that leaves a begun phrase loses that phrase's
  progress. Avoided phrases are masked: their last token is forbidden after the rest of the phrase.

Finished hypotheses are ranked as `generate()`'s beam search ranks them (log-probability / length ** length_penalty,
or the callable `length_penalty` that `generation_hf_attention.GnmtLengthPenalty` makes). If the length limit comes
first, the hypotheses that met the most constraint tokens are returned.
"""

from dataclasses import dataclass, field

import torch
from transformers.generation.utils import GenerateBeamEncoderDecoderOutput


@dataclass(frozen=True)
class LexicalConstraints:
    """One source's constraints, as target token ids: `include` phrases must appear, `avoid` phrases must not."""

    include: tuple[tuple[int, ...], ...] = ()
    avoid: tuple[tuple[int, ...], ...] = ()

    @classmethod
    def from_token_ids(cls, include=(), avoid=()) -> "LexicalConstraints":
        phrases = {"include": include, "avoid": avoid}
        for name, given in phrases.items():
            for index, phrase in enumerate(given):
                if not phrase:
                    raise ValueError(f"constraints: {name}[{index}] is empty; a phrase needs at least one token.")
        return cls(tuple(tuple(map(int, p)) for p in include), tuple(tuple(map(int, p)) for p in avoid))

    @property
    def token_count(self) -> int:
        return sum(len(phrase) for phrase in self.include)


@dataclass(frozen=True)
class PhraseState:
    """How far a hypothesis is through its `include` phrases: which it met, and the one it is inside (if any)."""

    met: tuple[bool, ...]
    inside: tuple[int, int] | None = None  # (phrase, tokens of it matched so far)
    _lengths: tuple[int, ...] = field(default=(), compare=False)

    @property
    def bank(self) -> int:
        """Constraint tokens met, the partial phrase included."""
        done = sum(length for length, met in zip(self._lengths, self.met, strict=True) if met)
        return done + (self.inside[1] if self.inside else 0)

    @property
    def all_met(self) -> bool:
        return all(self.met)

    def next_tokens(self, include: tuple[tuple[int, ...], ...]) -> set[int]:
        """The tokens that would meet one more constraint token."""
        if self.inside is not None:
            phrase, matched = self.inside
            return {include[phrase][matched]}
        return {phrase[0] for phrase, met in zip(include, self.met, strict=True) if not met}

    def advance(self, token: int, include: tuple[tuple[int, ...], ...]) -> "PhraseState":
        met = list(self.met)
        if self.inside is not None:
            phrase, matched = self.inside
            if include[phrase][matched] == token:
                if matched + 1 == len(include[phrase]):
                    met[phrase] = True
                    return PhraseState(tuple(met), None, self._lengths)
                return PhraseState(tuple(met), (phrase, matched + 1), self._lengths)
            # left the phrase: its progress is lost, and the token may begin another
        for phrase, tokens in enumerate(include):
            if not met[phrase] and tokens[0] == token:
                if len(tokens) == 1:
                    met[phrase] = True
                    return PhraseState(tuple(met), None, self._lengths)
                return PhraseState(tuple(met), (phrase, 1), self._lengths)
        return PhraseState(tuple(met), None, self._lengths)


def start_state(constraints: LexicalConstraints) -> PhraseState:
    include = constraints.include
    return PhraseState((False,) * len(include), None, tuple(len(phrase) for phrase in include))


def avoided_next_tokens(sequence: list[int], avoid: tuple[tuple[int, ...], ...]) -> list[int]:
    """The tokens that would complete an avoided phrase after `sequence`."""
    return [phrase[-1] for phrase in avoid if len(phrase) == 1 or sequence[-(len(phrase) - 1) :] == list(phrase[:-1])]


def penalised(score: float, length: int, length_penalty) -> float:
    """`generate()`'s beam score: the log-probability divided by length ** length_penalty."""
    return score / (length**length_penalty)


def constrained_beam_search(
    model,
    input_ids: torch.LongTensor,
    logits_processor,
    stopping_criteria,
    generation_config,
    synced_gpus: bool = False,
    constraints: list[LexicalConstraints | None] | None = None,
    **model_kwargs,
) -> GenerateBeamEncoderDecoderOutput | torch.LongTensor:
    """Beam search in which every hypothesis returned meets its source's `constraints` whenever the beam can meet
    them (see the module's docstring); a `custom_generate` method: `generate()` prepares the inputs and calls it.

    Args:
        constraints: one `LexicalConstraints` (or None: unconstrained) per source, in batch order.

    Raises:
        ValueError: a constraint list of another length than the batch, sampling, or a constraint longer than the
            length limit allows.
    """
    num_beams, num_return = generation_config.num_beams, generation_config.num_return_sequences
    if generation_config.do_sample:
        raise ValueError("constraints: constrained search is beam search; leave do_sample out.")
    batch_size = input_ids.shape[0] // num_beams
    constraints = list(constraints) if constraints is not None else [None] * batch_size
    if len(constraints) != batch_size:
        raise ValueError(f"constraints: {len(constraints)} entries for {batch_size} sources; give one per source "
                         "(None for none).")  # fmt: skip
    constraints = [c if c is not None else LexicalConstraints() for c in constraints]
    prompt_length = input_ids.shape[1]
    max_length = generation_config.max_length
    for index, given in enumerate(constraints):
        if given.token_count > max_length - prompt_length:
            raise ValueError(f"constraints[{index}]: {given.token_count} constraint tokens, more than the "
                             f"{max_length - prompt_length} new tokens allowed (max_new_tokens).")  # fmt: skip
    eos = generation_config._eos_token_tensor
    eos_ids = set(eos.flatten().tolist()) if eos is not None else set()
    pad = generation_config._pad_token_tensor
    # what transformers' beam search fills ended sequences with (`pad_token_id or eos_token_id[0]`: a pad id of 0
    # counts as none), so that both searches return the same tensors
    pad_id = int(pad) if pad is not None and int(pad) else min(eos_ids, default=0)
    length_penalty = generation_config.length_penalty if generation_config.length_penalty is not None else 1.0

    device = input_ids.device
    beams = [[(input_ids[b * num_beams].tolist(), 0.0, start_state(c))] for b, c in enumerate(constraints)]
    finished: list[list[tuple[float, list[int], PhraseState]]] = [[] for _ in range(batch_size)]
    done = [False] * batch_size

    outputs = model._prefill(input_ids, generation_config, model_kwargs)
    cur_len = prompt_length
    while True:
        model_kwargs = model._update_model_kwargs_for_generation(outputs, model_kwargs, is_encoder_decoder=True)
        logits = outputs.logits[:, -1, :].to(dtype=torch.float32, device=device)
        del outputs
        log_probs = logits_processor(_beam_rows(beams, num_beams, cur_len, pad_id, device), logits.log_softmax(-1))
        reorder, last_step = [], cur_len + 1 >= max_length
        for b in range(batch_size):
            alive = []
            if not done[b]:
                rows = log_probs[b * num_beams : (b + 1) * num_beams]
                for position, (slot, token, score, state) in enumerate(_step(beams[b], rows, constraints[b], eos_ids,
                                                                             num_beams)):  # fmt: skip
                    sequence = beams[b][slot][0] + [token]
                    if token in eos_ids:  # as in transformers, only among the first num_beams candidates
                        if position < num_beams:
                            length = len(sequence) - prompt_length
                            finished[b].append((penalised(score, length, length_penalty), sequence, state))
                    elif len(alive) < num_beams and (position < num_beams or not last_step):
                        alive.append((sequence, score, state, slot))  # the last step: as transformers ends
                finished[b] = sorted(finished[b], key=lambda item: -item[0])[:num_beams]
                length = cur_len + 1 - prompt_length
                done[b] = _is_done(finished[b], [score for _, score, _, _ in alive], num_beams, length, length_penalty)
                beams[b] = [] if done[b] else [(sequence, score, state) for sequence, score, state, _ in alive]
            slots = [slot for *_, slot in alive] or [0]
            reorder += [b * num_beams + slots[min(k, len(slots) - 1)] for k in range(num_beams)]
        cur_len += 1
        if all(done) or cur_len >= max_length:
            break
        cache = model_kwargs.get("cache")
        if cache is not None:
            model_kwargs["cache"] = model._reorder_cache(cache, torch.tensor(reorder, device=device))
        step_ids = _beam_rows(beams, num_beams, cur_len, pad_id, device)
        model_inputs = model.prepare_inputs_for_generation(step_ids, next_sequence_length=1, **model_kwargs)
        outputs = model(**model_inputs, return_dict=True)

    results = []
    for b in range(batch_size):
        running = [
            (penalised(score, len(sequence) - prompt_length, length_penalty), sequence, state)
            for sequence, score, state in beams[b]
        ]  # the hypotheses the length limit stopped
        complete = sorted(finished[b] + [r for r in running if r[2].all_met], key=lambda item: -item[0])[:num_beams]
        short = sorted((r for r in running if not r[2].all_met), key=lambda item: (-item[2].bank, -item[0]))
        best = complete + short[: max(num_return - len(complete), 0)]  # unmet only where the beam could not meet
        if not best:  # every continuation was forbidden (avoided phrases cover the vocabulary)
            best = [(-float("inf"), input_ids[b * num_beams].tolist(), start_state(constraints[b]))]
        results += [best[min(rank, len(best) - 1)] for rank in range(num_return)]
    longest = max(len(sequence) for _, sequence, _ in results)
    output = torch.full((len(results), longest), pad_id, dtype=torch.long, device=device)
    for row, (_, sequence, _) in enumerate(results):
        output[row, : len(sequence)] = torch.tensor(sequence, device=device)
    if not generation_config.return_dict_in_generate:
        return output
    scores = torch.tensor([score for score, _, _ in results], device=device)
    return GenerateBeamEncoderDecoderOutput(sequences=output, sequences_scores=scores, cache=model_kwargs.get("cache"))


def _beam_rows(beams: list, num_beams: int, length: int, pad_id: int, device) -> torch.LongTensor:
    """Every beam slot's sequence (B × num_beams, length); a slot with no live hypothesis repeats its source's last
    one, or holds padding when the source is done (its outputs are not used)."""
    rows = []
    for beam in beams:
        for k in range(num_beams):
            rows.append(beam[min(k, len(beam) - 1)][0] if beam else [pad_id] * length)
    return torch.tensor(rows, dtype=torch.long, device=device)


def _step(beam: list, log_probs: torch.Tensor, constraints: LexicalConstraints, eos_ids: set[int], num_beams: int):
    """The beam's next hypotheses: (slot, token, score, state), in the order dynamic beam allocation takes them."""
    scores = torch.full_like(log_probs, -float("inf"))
    for slot, (sequence, score, state) in enumerate(beam):
        row = log_probs[slot].clone()
        for token in avoided_next_tokens(sequence, constraints.avoid):
            row[token] = -float("inf")
        if not state.all_met:
            row[list(eos_ids)] = -float("inf")
        scores[slot] = row + score
    candidates = set()
    flat = scores.flatten()
    for index in torch.topk(flat, k=min(2 * num_beams, flat.numel())).indices.tolist():
        candidates.add(divmod(index, scores.shape[1]))
    for slot, (_, _, state) in enumerate(beam):
        candidates.add((slot, int(scores[slot].argmax())))
        candidates.update((slot, token) for token in state.next_tokens(constraints.include))
    ranked = []
    for slot, token in candidates:
        score = float(scores[slot, token])
        if score == -float("inf"):
            continue
        ranked.append((slot, token, score, beam[slot][2].advance(token, constraints.include)))
    by_bank: dict[int, list] = {}
    for candidate in sorted(ranked, key=lambda item: -item[2]):
        by_bank.setdefault(candidate[3].bank, []).append(candidate)
    order = sorted(
        ((rank, -bank, candidate) for bank, members in by_bank.items() for rank, candidate in enumerate(members)),
        key=lambda item: (item[0], item[1]),
    )
    return [candidate for *_, candidate in order][: 2 * num_beams]


def _is_done(finished: list, alive_scores: list[float], num_beams: int, length: int, length_penalty) -> bool:
    """Whether no live hypothesis can beat the worst of `num_beams` finished ones (transformers' heuristic for
    `early_stopping=False`: the best live score at the current length)."""
    if not alive_scores:
        return True
    if len(finished) < num_beams:
        return False
    return penalised(max(alive_scores), length, length_penalty) <= finished[-1][0]
