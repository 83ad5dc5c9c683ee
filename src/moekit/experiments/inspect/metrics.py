"""What the experts learned: pure functions over recorded routings (numpy, no model).

Every function takes the routing of one MoE layer as arrays and returns plain numbers, so each
one is tested on routings built by hand where the answer is known (tests/test_inspect.py).

Shape suffixes: T tokens of the probe (all domains, concatenated), K choices per token (top_k;
the most any token got under expert choice), E experts, G groups (domains, or domains + the
whole), V vocabulary, P position buckets, C token classes.

Conventions:
  expert_TK   the router's choices, column k = the (k+1)-th choice; -1 = no choice at that rank
  token_T     token ids;  position_T  index inside its sequence;  sequence_T  which sequence
  A "share" is a share of assignments (one token with top-2 makes two), not of tokens.

References: Mixtral (Jiang et al. 2024, §5: Fig. 7 shares per domain, Fig. 8 text by first
choice, Table 5 consecutive repetition); OpenMoE (Xue et al. 2024, §4: context-independent
specialisation, routing fixed early in training, drops towards the end of sequences);
ST-MoE (Zoph et al. 2022, §7: experts for punctuation, numbers, names; routing entropy).
"""

from __future__ import annotations

import math

import numpy as np

CHOICES = ("either", "first", "second")
TOKEN_CLASSES = ("indent", "space", "newline", "punct", "digit", "upper", "lower", "other")


def choice_columns(expert_TK: np.ndarray, choice: str) -> np.ndarray:
    """The experts of one choice as a flat array: "either" = every choice, "first" = rank 0,
    "second" = rank 1; missing choices (-1) left out."""
    if choice == "either":
        chosen = expert_TK.reshape(-1)
    elif choice == "first":
        chosen = expert_TK[:, 0]
    elif choice == "second":
        chosen = expert_TK[:, 1] if expert_TK.shape[1] > 1 else np.empty(0, dtype=expert_TK.dtype)
    else:
        raise ValueError(f"choice={choice!r} is invalid: use one of {CHOICES}")
    return chosen[chosen >= 0]


def assignment_shares(
    expert_TK: np.ndarray, group_T: np.ndarray, num_groups: int, num_experts: int, choice: str = "either"
) -> tuple[np.ndarray, np.ndarray]:
    """Share of each group's assignments (of the given choice) that went to each expert.

    Returns shares_GE (rows sum to 1; 0 for a group without assignments) and the assignment
    counts per group. Mixtral Fig. 7 plots these per domain, with 1/E the uniform share.
    """
    if choice == "either":
        group_N = np.repeat(group_T, expert_TK.shape[1])
        expert_N = expert_TK.reshape(-1)
    else:
        column = 0 if choice == "first" else 1
        if column >= expert_TK.shape[1]:
            return np.zeros((num_groups, num_experts)), np.zeros(num_groups, dtype=np.int64)
        group_N, expert_N = group_T, expert_TK[:, column]
    valid_N = expert_N >= 0
    counts_GE = np.bincount(
        group_N[valid_N] * num_experts + expert_N[valid_N], minlength=num_groups * num_experts
    ).reshape(num_groups, num_experts)
    totals_G = counts_GE.sum(axis=1)
    shares_GE = counts_GE / np.maximum(totals_G, 1)[:, None]
    return shares_GE, totals_G


def js_divergence(p_E: np.ndarray, q_E: np.ndarray) -> float:
    """Jensen-Shannon divergence in bits, in [0, 1]: 0 for equal distributions, 1 for disjoint.

    JS(p, q) = ½ KL(p ‖ m) + ½ KL(q ‖ m), m = ½ (p + q) (Lin 1991); symmetric and finite even
    where one distribution is 0.
    """
    p_E = np.asarray(p_E, dtype=np.float64)
    q_E = np.asarray(q_E, dtype=np.float64)
    m_E = 0.5 * (p_E + q_E)

    def kl(a_E: np.ndarray) -> float:
        nonzero = a_E > 0
        return float(np.sum(a_E[nonzero] * np.log2(a_E[nonzero] / m_E[nonzero])))

    return max(0.0, 0.5 * kl(p_E) + 0.5 * kl(q_E))


def domain_divergence(
    expert_TK: np.ndarray,
    domain_T: np.ndarray,
    sequence_T: np.ndarray,
    num_domains: int,
    num_experts: int,
    choice: str = "either",
    num_shuffles: int = 5,
    seed: int = 0,
) -> dict[str, list[float]]:
    """JS divergence of each domain's expert shares from the whole probe's, and the same with
    the domain labels shuffled across whole sequences (sizes kept): what finite samples and
    the correlation inside a sequence give when routing ignores the domain."""
    whole_E, _ = assignment_shares(expert_TK, np.zeros_like(domain_T), 1, num_experts, choice)
    shares_DE, _ = assignment_shares(expert_TK, domain_T, num_domains, num_experts, choice)
    js_D = [js_divergence(shares_DE[d], whole_E[0]) for d in range(num_domains)]
    # One label per sequence (a sequence never spans two domains), permuted as a block.
    sequences, first_index = np.unique(sequence_T, return_index=True)
    domain_of_sequence = domain_T[first_index]
    position_of_sequence_T = np.searchsorted(sequences, sequence_T)
    rng = np.random.default_rng(seed)
    shuffled_SD = np.zeros((num_shuffles, num_domains))
    for s in range(num_shuffles):
        labels_T = rng.permutation(domain_of_sequence)[position_of_sequence_T]
        shuffled_DE, _ = assignment_shares(expert_TK, labels_T, num_domains, num_experts, choice)
        shuffled_SD[s] = [js_divergence(shuffled_DE[d], whole_E[0]) for d in range(num_domains)]
    return {"js": js_D, "shuffled_js": shuffled_SD.mean(axis=0).tolist()}


def consecutive_pairs(sequence_T: np.ndarray, position_T: np.ndarray) -> np.ndarray:
    """Indices t whose token t-1 precedes it in the same sequence."""
    t = np.arange(1, len(sequence_T))
    same = (sequence_T[1:] == sequence_T[:-1]) & (position_T[1:] == position_T[:-1] + 1)
    return t[same]


def _overlap_counts(a_TK: np.ndarray, b_TK: np.ndarray) -> np.ndarray:
    """|A_t ∩ B_t| per token, A and B the sets of valid (>= 0) experts of each row."""
    equal_TKK = (a_TK[:, :, None] == b_TK[:, None, :]) & (a_TK[:, :, None] >= 0)
    return equal_TKK.any(axis=2).sum(axis=1)


def consecutive_repetition(expert_TK: np.ndarray, sequence_T: np.ndarray, position_T: np.ndarray) -> dict:
    """How often token t goes where token t-1 went (Mixtral Table 5).

    first       P(first choice of t == first choice of t-1)
    any_shared  P(the top-k sets of t and t-1 share at least one expert) ("first or second")
    overlap     mean |A_t ∩ A_{t-1}| / k: the share of top-k choices repeated
    """
    t = consecutive_pairs(sequence_T, position_T)
    if t.size == 0:
        return {"pairs": 0, "first": None, "any_shared": None, "overlap": None}
    top_k = expert_TK.shape[1]
    both_chose = (expert_TK[t, 0] >= 0) & (expert_TK[t - 1, 0] >= 0)
    first = (expert_TK[t, 0] == expert_TK[t - 1, 0])[both_chose]
    overlap_T = _overlap_counts(expert_TK[t], expert_TK[t - 1])
    return {
        "pairs": int(t.size),
        "first": float(first.mean()) if first.size else None,
        "any_shared": float((overlap_T > 0).mean()),
        "overlap": float(overlap_T.mean() / top_k),
    }


def uniform_repetition_baselines(num_experts: int, top_k: int) -> dict[str, float]:
    """What consecutive tokens repeat when each token draws its k experts uniformly at random.

    first: 1/E. overlap: each of B's k experts lies in A with probability k/E, so
    E|A ∩ B| = k·k/E and the share of choices repeated is k/E. any_shared: fix A; B is one of
    the C(E, k) k-subsets, equally likely, and misses A exactly when it is one of the C(E−k, k)
    subsets of the E−k experts outside A, so P(share ≥ 1) = 1 − C(E−k, k)/C(E, k)
    (Mixtral Table 5: 1 − 6/8·5/7 ≈ 46% for E = 8, k = 2).
    """
    disjoint = math.comb(num_experts - top_k, top_k) / math.comb(num_experts, top_k)
    return {"first": 1.0 / num_experts, "any_shared": 1.0 - disjoint, "overlap": top_k / num_experts}


def load_matched_repetition_baselines(
    expert_TK: np.ndarray, num_experts: int, seed: int = 0, max_exact_sets: int = 4096
) -> dict[str, float]:
    """What consecutive tokens repeat when each token's choices are drawn independently from
    the measured routing (its expert loads), i.e. repetition with no sequential structure.

    first: Σ_i p_i², p_i the share of first choices of expert i. overlap: Σ_i r_i² / k, r_i the
    share of tokens with i among their choices (E|A ∩ B| = Σ_i P(i ∈ A) P(i ∈ B)). any_shared:
    Σ_{A,B} P(A) P(B) [A ∩ B ≠ ∅] over the measured distribution of top-k sets, exact when there
    are few distinct sets (and E ≤ 62), else estimated on a seeded random pairing of tokens.
    """
    num_tokens, top_k = expert_TK.shape
    first_E = np.bincount(expert_TK[:, 0][expert_TK[:, 0] >= 0], minlength=num_experts) / max(num_tokens, 1)
    valid_TK = expert_TK >= 0
    member_E = np.bincount(expert_TK[valid_TK], minlength=num_experts) / max(num_tokens, 1)
    result = {"first": float(np.sum(first_E**2)), "overlap": float(np.sum(member_E**2) / top_k)}
    if num_experts <= 62:
        masks_T = np.where(valid_TK, np.left_shift(np.int64(1), np.where(valid_TK, expert_TK, 0)), 0).sum(axis=1)
        sets, counts = np.unique(masks_T, return_counts=True)
        if sets.size <= max_exact_sets:
            freq = counts / counts.sum()
            shared = (np.bitwise_and(sets[:, None], sets[None, :]) != 0).astype(np.float64)
            result["any_shared"] = float(freq @ shared @ freq)
            return result
    rng = np.random.default_rng(seed)
    partner_T = rng.permutation(num_tokens)
    result["any_shared"] = float((_overlap_counts(expert_TK, expert_TK[partner_T]) > 0).mean())
    return result


def position_buckets(seq_len: int) -> list[int]:
    """Left edges of doubling position buckets: [0], [1], [2, 4), [4, 8), ... up to seq_len."""
    edges = [0, 1]
    while edges[-1] * 2 < seq_len:
        edges.append(edges[-1] * 2)
    return edges


def bucket_labels(edges: list[int], seq_len: int) -> list[str]:
    labels = []
    for i, lo in enumerate(edges):
        hi = edges[i + 1] if i + 1 < len(edges) else seq_len
        labels.append(str(lo) if hi - lo == 1 else f"{lo}-{hi - 1}")
    return labels


def token_determinism(
    token_T: np.ndarray,
    expert_T: np.ndarray,
    sequence_T: np.ndarray,
    position_T: np.ndarray,
    num_experts: int,
    vocab_size: int,
    bucket_edges: list[int],
    min_count: int = 10,
) -> dict:
    """How well the token id alone predicts its (first-choice) expert (OpenMoE §4.1).

    Fit "the majority expert of each token id" on the even-numbered sequences, for ids seen at
    least ``min_count`` times there; measure its accuracy on the odd-numbered ones (held out:
    no window is in both halves). ``coverage`` is the share of held-out tokens whose id was
    fitted; ``majority_baseline`` predicts the most common expert for every token; accuracy by
    position bucket shows whether context takes over later in a sequence.
    """
    valid = expert_T >= 0
    fit = valid & (sequence_T % 2 == 0)
    test = valid & (sequence_T % 2 == 1)
    counts_VE = np.bincount(token_T[fit] * num_experts + expert_T[fit], minlength=vocab_size * num_experts).reshape(
        vocab_size, num_experts
    )
    fitted_V = counts_VE.sum(axis=1) >= min_count
    majority_V = counts_VE.argmax(axis=1)
    covered = test & fitted_V[token_T]
    correct_T = majority_V[token_T] == expert_T
    overall_majority = int(np.bincount(expert_T[fit], minlength=num_experts).argmax()) if fit.any() else 0
    bucket_T = np.searchsorted(np.asarray(bucket_edges), position_T, side="right") - 1
    by_position = []
    for b in range(len(bucket_edges)):
        in_bucket = covered & (bucket_T == b)
        by_position.append(float(correct_T[in_bucket].mean()) if in_bucket.any() else None)
    num_test = int(test.sum())
    return {
        "accuracy": float(correct_T[covered].mean()) if covered.any() else None,
        "coverage": float(covered.sum() / num_test) if num_test else 0.0,
        "majority_baseline": float((expert_T[covered] == overall_majority).mean()) if covered.any() else None,
        "chance": 1.0 / num_experts,
        "fitted_token_ids": int(fitted_V.sum()),
        "held_out_tokens": int(covered.sum()),
        "min_count": min_count,
        "by_position": by_position,
    }


def top_tokens(
    token_T: np.ndarray,
    expert_T: np.ndarray,
    num_experts: int,
    vocab_size: int,
    n: int = 10,
    min_count: int = 20,
) -> list[dict[str, list]]:
    """Per expert: its n most frequent token ids ([id, count, share of the expert's tokens])
    and its n highest-lift ids ([id, lift, count]), lift = P(token | expert) / P(token), among
    ids seen at least ``min_count`` times overall and at least 5 times at the expert."""
    valid = expert_T >= 0
    counts_EV = np.bincount(expert_T[valid] * vocab_size + token_T[valid], minlength=num_experts * vocab_size).reshape(
        num_experts, vocab_size
    )
    total_V = counts_EV.sum(axis=0)
    total = max(int(total_V.sum()), 1)
    result = []
    for e in range(num_experts):
        row_V = counts_EV[e]
        size = int(row_V.sum())
        by_count = [i for i in np.argsort(-row_V, kind="stable")[:n] if row_V[i] > 0]
        eligible_V = (total_V >= min_count) & (row_V >= 5)
        lift_V = np.where(eligible_V, (row_V / max(size, 1)) / np.maximum(total_V / total, 1e-12), 0.0)
        by_lift = [i for i in np.argsort(-lift_V, kind="stable")[:n] if lift_V[i] > 0]
        result.append(
            {
                "tokens": size,
                "by_count": [[int(i), int(row_V[i]), float(row_V[i] / size)] for i in by_count],
                "by_lift": [[int(i), float(lift_V[i]), int(row_V[i])] for i in by_lift],
            }
        )
    return result


def classify_pieces(pieces: list[str]) -> np.ndarray:
    """A class per token occurrence (index into TOKEN_CLASSES), from the decoded text pieces
    of consecutive tokens: "indent" is whitespace at the start of a line (Python indentation),
    "space" other whitespace; letters by case of their first letter; "other" non-ASCII."""
    classes_T = np.empty(len(pieces), dtype=np.int64)
    at_line_start = True
    index = {name: i for i, name in enumerate(TOKEN_CLASSES)}
    for t, piece in enumerate(pieces):
        stripped = piece.replace("\n", "")
        if "\n" in piece and not stripped.strip():
            name = "newline"
        elif piece and not piece.strip():
            name = "indent" if at_line_start else "space"
        else:
            text = piece.strip()
            letters = [c for c in text if c.isalpha()]
            if any(ord(c) > 127 for c in text):
                name = "other"
            elif letters:
                name = "upper" if letters[0].isupper() else "lower"
            elif any(c.isdigit() for c in text):
                name = "digit"
            else:
                name = "punct"
        classes_T[t] = index[name]
        if "\n" in piece:
            at_line_start = not piece.rsplit("\n", 1)[1].strip()
        elif piece.strip():
            at_line_start = False
    return classes_T


def class_profile(class_T: np.ndarray, expert_T: np.ndarray, num_experts: int) -> dict[str, list]:
    """Per expert, the share of its (first-choice) tokens in each token class, and the lift
    of each class at the expert (share at the expert / share overall)."""
    num_classes = len(TOKEN_CLASSES)
    valid = expert_T >= 0
    counts_EC = np.bincount(
        expert_T[valid] * num_classes + class_T[valid], minlength=num_experts * num_classes
    ).reshape(num_experts, num_classes)
    share_EC = counts_EC / np.maximum(counts_EC.sum(axis=1, keepdims=True), 1)
    overall_C = counts_EC.sum(axis=0) / max(int(counts_EC.sum()), 1)
    lift_EC = np.where(overall_C > 0, share_EC / np.maximum(overall_C, 1e-12), 0.0)
    return {"share": share_EC.tolist(), "lift": lift_EC.tolist(), "overall": overall_C.tolist()}


def load_stats(expert_TK: np.ndarray, entropy_T: np.ndarray, num_experts: int) -> dict:
    """Load (share of all assignments per expert), its coefficient of variation (std / mean of
    the counts, 0 = even), dead experts (no assignment on the probe), and the mean router
    entropy in nats against its maximum log E (ST-MoE §7)."""
    counts_E = np.bincount(expert_TK[expert_TK >= 0], minlength=num_experts)
    mean = counts_E.mean()
    return {
        "load": (counts_E / max(int(counts_E.sum()), 1)).tolist(),
        "cv": float(counts_E.std() / mean) if mean > 0 else 0.0,
        "dead": [int(e) for e in np.flatnonzero(counts_E == 0)],
        "entropy": float(entropy_T.mean()) if entropy_T.size else 0.0,
        "entropy_max": math.log(num_experts),
    }


def drops_by_position(
    expert_TK: np.ndarray, kept_TK: np.ndarray, position_T: np.ndarray, bucket_edges: list[int]
) -> dict[str, list]:
    """Per position bucket: the share of assignments dropped by capacity, and of tokens left
    with no expert at all (OpenMoE §4.3: drops pile up towards the end of sequences)."""
    valid_TK = expert_TK >= 0
    dropped_TK = valid_TK & ~kept_TK
    bucket_T = np.searchsorted(np.asarray(bucket_edges), position_T, side="right") - 1
    assignments, tokens = [], []
    for b in range(len(bucket_edges)):
        rows = bucket_T == b
        routed = int(valid_TK[rows].sum())
        assignments.append(float(dropped_TK[rows].sum() / routed) if routed else None)
        had_choice = valid_TK[rows].any(axis=1)
        lost = had_choice & ~(valid_TK[rows] & kept_TK[rows]).any(axis=1)
        tokens.append(float(lost.sum() / had_choice.sum()) if had_choice.any() else None)
    total = int(valid_TK.sum())
    return {
        "assignments": assignments,
        "tokens": tokens,
        "overall": float(dropped_TK.sum() / total) if total else 0.0,
    }


def routing_agreement(expert_TK: np.ndarray, reference_TK: np.ndarray) -> dict[str, float]:
    """How much of a checkpoint's routing the reference (the final model) shares on the same
    probe: equal first choices, and the share of top-k choices in common (OpenMoE §4.2)."""
    top_k = reference_TK.shape[1]
    return {
        "first": float((expert_TK[:, 0] == reference_TK[:, 0]).mean()),
        "topk": float(_overlap_counts(expert_TK, reference_TK).mean() / top_k),
    }
