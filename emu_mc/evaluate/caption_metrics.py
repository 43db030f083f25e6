"""Captioning metrics as the COCO caption evaluation (pycocoevalcap) computes them: PTB tokenisation,
corpus BLEU-1..4 and CIDEr-D (pycocoevalcap's "CIDEr").

Tokeniser: pycocoevalcap's PTBTokenizer (Stanford CoreNLP, needs `java` and the pycocoevalcap package)
when both are present; otherwise `simple_ptb_tokenize`, a pure-Python approximation (lower case, PTB
clitic splits, the punctuation PTBTokenizer drops removed). `tokenize_corpus` says which one ran; the
results JSON records it, since the two can differ on rare punctuation and hence in the last digit.
"""
import logging
import math
import re
import shutil
from collections import Counter, defaultdict
from typing import Dict, List, Tuple

log = logging.getLogger("emu_mc.evaluate")

Corpus = Dict[str, List[str]]  # id -> sentences (one for a prediction, several for references)

_CLITICS = re.compile(r"(n't|'s|'re|'ve|'ll|'d|'m)\b")
_DROPPED = re.compile(r"[\"'`()\[\]{}.?!,:;]|-{1,2}|\.\.\.")


def simple_ptb_tokenize(sentence: str) -> List[str]:
    """"A Dog's toy, (red)." -> ["a", "dog", "'s", "toy", "red"]: the tokens PTBTokenizer keeps."""
    text = _CLITICS.sub(r" \1", sentence.lower().replace("\n", " "))
    tokens = []
    for word in text.split():
        if _CLITICS.fullmatch(word):
            tokens.append(word)
        else:
            tokens.extend(_DROPPED.sub(" ", word).split())
    return tokens


def _java_ptb_available() -> bool:
    if shutil.which("java") is None:
        return False
    try:
        import pycocoevalcap.tokenizer.ptbtokenizer  # noqa: F401
    except ImportError:
        return False
    return True


def tokenize_corpus(corpus: Corpus, tokenizer: str = "auto") -> Tuple[Dict[str, List[List[str]]], str]:
    """(id -> tokenised sentences, name of the tokeniser that ran: "ptb-java" or "ptb-python").
    tokenizer: auto (Java when present) | java | python."""
    use_java = tokenizer == "java" or (tokenizer == "auto" and _java_ptb_available())
    if use_java:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        joined = PTBTokenizer().tokenize({k: [{"caption": s} for s in v] for k, v in corpus.items()})
        return {k: [s.split() for s in v] for k, v in joined.items()}, "ptb-java"
    return {k: [simple_ptb_tokenize(s) for s in v] for k, v in corpus.items()}, "ptb-python"


def _ngrams(tokens: List[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def bleu(predictions: Dict[str, List[str]], references: Dict[str, List[List[str]]], max_n: int = 4) -> List[float]:
    """Corpus BLEU-1..max_n of tokenised predictions (one token list each) against references, as
    pycocoevalcap's Bleu ("closest" reference length, its 1e-9 / 1e-15 smoothing)."""
    correct, total = [0] * max_n, [0] * max_n
    hyp_len = ref_len = 0
    for key, hyp in predictions.items():
        refs = references[key]
        hyp_len += len(hyp)
        ref_len += min((abs(len(r) - len(hyp)), len(r)) for r in refs)[1]
        for n in range(1, max_n + 1):
            counts = _ngrams(hyp, n)
            best = Counter()
            for r in refs:
                best |= _ngrams(r, n)
            correct[n - 1] += sum(min(c, best[g]) for g, c in counts.items())
            total[n - 1] += max(len(hyp) - n + 1, 0)
    tiny, small = 1e-15, 1e-9
    brevity = math.exp(min(0.0, 1 - (ref_len + tiny) / (hyp_len + tiny)))
    scores, log_sum = [], 0.0
    for n in range(max_n):
        log_sum += math.log((correct[n] + tiny) / (total[n] + small))
        scores.append(brevity * math.exp(log_sum / (n + 1)))
    return scores


def _tfidf(counts: Counter, doc_freq: Dict[tuple, float], log_num_docs: float):
    """Per-order tf-idf vectors, their norms, and the length pycocoevalcap uses (its bigram count)."""
    vecs = [defaultdict(float) for _ in range(4)]
    norms = [0.0] * 4
    length = 0
    for gram, tf in counts.items():
        n = len(gram) - 1
        vecs[n][gram] = tf * (log_num_docs - math.log(max(1.0, doc_freq[gram])))
        norms[n] += vecs[n][gram] ** 2
        if n == 1:
            length += tf
    return vecs, [math.sqrt(x) for x in norms], length


def cider_d(predictions: Dict[str, List[str]], references: Dict[str, List[List[str]]],
            sigma: float = 6.0) -> Tuple[float, Dict[str, float]]:
    """(corpus CIDEr-D, per-id scores) of tokenised predictions: tf-idf of 1-4-grams with document
    frequencies from the references of the ids scored, clipped cosine, Gaussian length penalty, x 10."""
    def all_grams(tokens):
        return sum((_ngrams(tokens, n) for n in range(1, 5)), Counter())

    ref_counts = {k: [all_grams(r) for r in references[k]] for k in predictions}
    doc_freq = Counter()
    for counts in ref_counts.values():
        doc_freq.update(set().union(*[set(c) for c in counts]))
    log_num_docs = math.log(float(len(predictions))) if predictions else 0.0
    per_id = {}
    for key, hyp in predictions.items():
        vh, nh, lh = _tfidf(all_grams(hyp), doc_freq, log_num_docs)
        total = 0.0
        for counts in ref_counts[key]:
            vr, nr, lr = _tfidf(counts, doc_freq, log_num_docs)
            for n in range(4):
                val = sum(min(vh[n][g], vr[n][g]) * vr[n][g] for g in vh[n])
                if nh[n] != 0 and nr[n] != 0:
                    val /= nh[n] * nr[n]
                total += val * math.exp(-((lh - lr) ** 2) / (2 * sigma ** 2)) / 4
        per_id[key] = total / len(ref_counts[key]) * 10.0
    score = sum(per_id.values()) / len(per_id) if per_id else 0.0
    return score, per_id


def caption_scores(predictions: Dict[str, str], references: Corpus, tokenizer: str = "auto") -> Dict[str, object]:
    """{"CIDEr": x100, "BLEU-4": x100, "BLEU-1": x100, "tokenizer": name} for raw caption strings."""
    refs, name = tokenize_corpus({k: references[k] for k in predictions}, tokenizer)
    hyps, _ = tokenize_corpus({k: [v] for k, v in predictions.items()}, tokenizer)
    hyps = {k: v[0] for k, v in hyps.items()}
    log.info("caption metrics: %s tokenisation", name)
    bleus = bleu(hyps, refs)
    cider, _ = cider_d(hyps, refs)
    return {"CIDEr": 100 * cider, "BLEU-4": 100 * bleus[3], "BLEU-1": 100 * bleus[0], "tokenizer": name}
