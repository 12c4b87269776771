"""Text similarity metrics for the ``text_similarity`` grader, in pure Python.

Every function returns a float in [0, 1]; ``hypothesis`` is the graded text, ``reference`` the text it is
graded against. The algorithms (docs/graders.md says the same):

- **fuzzy_match**: normalized Levenshtein similarity on characters, ``1 - distance / max(len)``; two empty
  strings score 1. The distance is computed bit-parallel (Myers 1999 in Hyyrö's formulation), one pass of a
  few big-integer operations per character, so long texts stay fast.
- **bleu**: sentence BLEU (Papineni et al. 2002) over 1- to 4-grams of ``\\w+|[^\\w\\s]`` tokens (words and
  single punctuation marks, case kept), with the brevity penalty, sacreBLEU's ``exp`` smoothing (the k-th
  n-gram order with no match counts as ``1 / (2**k * total)``) and its effective order (orders the
  hypothesis is too short to have are left out). No match at all, or an empty hypothesis, scores 0.
- **gleu**: sentence GLEU (Wu et al. 2016, as NLTK computes it): the 1- to 4-grams of both sides pooled,
  ``matches / max(hypothesis n-grams, reference n-grams)``, i.e. min(precision, recall).
- **rouge_1 .. rouge_5**: ROUGE-N F1 (Lin 2004) over lowercased ``\\w+`` tokens: clipped n-gram overlap,
  F1 of precision (over the hypothesis' n-grams) and recall (over the reference's). No stemming.
- **rouge_l**: ROUGE-L F1 from the longest common subsequence of the same tokens (bit-parallel LCS).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Hashable, Sequence

_BLEU_TOKEN = re.compile(r"\w+|[^\w\s]")
_ROUGE_TOKEN = re.compile(r"\w+")


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions of one character each cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    m = len(b)
    if m == 0:
        return len(a)
    positions: dict[str, int] = {}
    for index, char in enumerate(b):
        positions[char] = positions.get(char, 0) | (1 << index)
    mask = (1 << m) - 1
    high = 1 << (m - 1)
    plus, minus, distance = mask, 0, m  # vertical deltas of the DP column over b: all +1 at the start
    for char in a:
        eq = positions.get(char, 0)
        xv = eq | minus
        xh = (((eq & plus) + plus) ^ plus) | eq
        horizontal_plus = minus | ~(xh | plus)
        horizontal_minus = plus & xh
        if horizontal_plus & high:
            distance += 1
        elif horizontal_minus & high:
            distance -= 1
        horizontal_plus = (horizontal_plus << 1) | 1  # row 0 grows by one per character of a
        horizontal_minus <<= 1
        plus = (horizontal_minus | ~(xv | horizontal_plus)) & mask
        minus = (horizontal_plus & xv) & mask
    return distance


def fuzzy_match(hypothesis: str, reference: str) -> float:
    longest = max(len(hypothesis), len(reference))
    if longest == 0:
        return 1.0
    return 1.0 - levenshtein(hypothesis, reference) / longest


def lcs_length(a: Sequence[Hashable], b: Sequence[Hashable]) -> int:
    """Length of the longest common subsequence (Hyyrö 2004: V = (V + U) | (V - U), U = V & match(x))."""
    if not a or not b:
        return 0
    positions: dict[Hashable, int] = {}
    for index, token in enumerate(b):
        positions[token] = positions.get(token, 0) | (1 << index)
    mask = (1 << len(b)) - 1
    v = mask
    for token in a:
        u = v & positions.get(token, 0)
        v = ((v + u) | (v - u)) & mask
    return len(b) - v.bit_count()


def bleu_tokens(text: str) -> list[str]:
    return _BLEU_TOKEN.findall(text)


def rouge_tokens(text: str) -> list[str]:
    return _ROUGE_TOKEN.findall(text.lower())


def _ngrams(tokens: Sequence[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def _clipped_matches(hyp: Counter[tuple[str, ...]], ref: Counter[tuple[str, ...]]) -> int:
    return sum(min(count, ref[gram]) for gram, count in hyp.items())


def sentence_bleu(hypothesis: str, reference: str, max_order: int = 4) -> float:
    hyp, ref = bleu_tokens(hypothesis), bleu_tokens(reference)
    if not hyp:
        return 0.0
    correct, totals = [], []
    for n in range(1, max_order + 1):
        hyp_grams = _ngrams(hyp, n)
        correct.append(_clipped_matches(hyp_grams, _ngrams(ref, n)))
        totals.append(sum(hyp_grams.values()))
    if not any(correct):
        return 0.0
    log_precisions: list[float] = []
    smoothing = 1.0
    for n_correct, n_total in zip(correct, totals, strict=True):
        if n_total == 0:
            break  # effective order: the hypothesis has no n-grams this long
        if n_correct == 0:
            smoothing *= 2
            log_precisions.append(math.log(1.0 / (smoothing * n_total)))
        else:
            log_precisions.append(math.log(n_correct / n_total))
    brevity = 1.0 if len(hyp) >= len(ref) else math.exp(1 - len(ref) / len(hyp))
    return brevity * math.exp(sum(log_precisions) / len(log_precisions))


def sentence_gleu(hypothesis: str, reference: str, max_order: int = 4) -> float:
    hyp, ref = bleu_tokens(hypothesis), bleu_tokens(reference)
    hyp_grams: Counter[tuple[str, ...]] = Counter()
    ref_grams: Counter[tuple[str, ...]] = Counter()
    for n in range(1, max_order + 1):
        hyp_grams.update(_ngrams(hyp, n))
        ref_grams.update(_ngrams(ref, n))
    most = max(sum(hyp_grams.values()), sum(ref_grams.values()))
    return _clipped_matches(hyp_grams, ref_grams) / most if most else 0.0


def _f1(overlap: int, hyp_count: int, ref_count: int) -> float:
    if overlap == 0 or hyp_count == 0 or ref_count == 0:
        return 0.0
    precision, recall = overlap / hyp_count, overlap / ref_count
    return 2 * precision * recall / (precision + recall)


def rouge_n(hypothesis: str, reference: str, n: int) -> float:
    hyp_grams = _ngrams(rouge_tokens(hypothesis), n)
    ref_grams = _ngrams(rouge_tokens(reference), n)
    overlap = _clipped_matches(hyp_grams, ref_grams)
    return _f1(overlap, sum(hyp_grams.values()), sum(ref_grams.values()))


def rouge_l(hypothesis: str, reference: str) -> float:
    hyp, ref = rouge_tokens(hypothesis), rouge_tokens(reference)
    return _f1(lcs_length(hyp, ref), len(hyp), len(ref))
