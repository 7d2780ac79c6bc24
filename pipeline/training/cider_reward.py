"""CIDEr-D as a reward: many sampled captions scored at once against fixed references.

The same quantity as pycocoevalcap's `CiderScorer` (CIDEr-D, Vedantam et al. 2015), with
two differences of use, not of formula:

- The document frequencies and the corpus size N come once from a fixed corpus (for
  fine-tuning: the training split's references), not from the captions being scored, so a
  reward does not depend on which other images share the batch.
- Captions are integer token ids, and every n-gram of every candidate is handled in NumPy
  arrays (sorts, searches, bincounts): no Python loop per caption or per n-gram.

The formula, as pycocoevalcap computes it (n = 1..4):

    g(x)      = count of n-gram x in the caption * (log N - log max(1, df(x)))
    sim_n     = sum over the candidate's n-grams x of min(g_c(x), g_r(x)) * g_r(x)
                / (|g_c|_n * |g_r|_n)            (only when both norms are non-zero)
                * exp(-(l_c - l_r)^2 / (2 sigma^2)),    sigma = 6
    CIDEr-D   = 10 * mean over n of (sum over the image's references r of sim_n) / #refs

where `l` is what pycocoevalcap counts as the length: the number of *bigrams* (words - 1,
at least 0), a quirk kept so the figures agree to 1e-6 (tested). Fine-tuning appends
`<end>` to candidates and references alike, so "a dog runs on the" (no `<end>` after
"the" in any reference) loses the n-grams "on the <end>", "the <end>" that a complete
caption earns.
"""

import numpy as np

NGRAM_ORDER = 4
SIGMA = 6.0
# n-grams are packed into one int64 as digits of base (vocabulary size + 1); four digits
# must stay below 2**63.
MAX_VOCABULARY = 55_000


def _ngram_keys(token_ids, lengths, order, base):
    """All n-grams of padded captions as (caption index, key, order) arrays.

    Args:
        token_ids: int [M, T], rows padded past `lengths`.
        lengths: int [M], tokens per caption.
        order: int, largest n.
        base: int > every token id + 1.
    Returns:
        (rows int64 [G], keys int64 [G], orders int64 [G] in 1..order); a key encodes the
        n-gram's tokens as digits (id + 1) of `base`, so n-grams of different n never collide.
    """
    token_ids = np.asarray(token_ids, dtype=np.int64)
    lengths = np.asarray(lengths, dtype=np.int64)
    count, width = token_ids.shape if token_ids.ndim == 2 else (0, 0)
    rows, keys, orders = [], [], []
    digits = token_ids + 1
    for n in range(1, order + 1):
        if width < n:
            break
        key = np.zeros((count, width - n + 1), dtype=np.int64)
        for offset in range(n):
            key = key * base + digits[:, offset:width - n + 1 + offset]
        valid = np.arange(width - n + 1)[np.newaxis, :] + n <= lengths[:, np.newaxis]
        row_index, _ = np.nonzero(valid)
        rows.append(row_index)
        keys.append(key[valid])
        orders.append(np.full(len(row_index), n, dtype=np.int64))
    if not rows:
        empty = np.zeros((0,), np.int64)
        return empty, empty, empty
    return np.concatenate(rows), np.concatenate(keys), np.concatenate(orders)


def _count_ngrams(rows, keys, orders):
    """Unique (row, key) pairs with their counts: (rows, keys, orders, counts), sorted by row then key."""
    if len(rows) == 0:
        return rows, keys, orders, np.zeros((0,), np.float64)
    order = np.lexsort((keys, rows))
    rows, keys, orders = rows[order], keys[order], orders[order]
    starts = np.concatenate([[True], (rows[1:] != rows[:-1]) | (keys[1:] != keys[:-1])])
    first = np.flatnonzero(starts)
    counts = np.diff(np.append(first, len(rows))).astype(np.float64)
    return rows[first], keys[first], orders[first], counts


def _pad_sequences(sequences):
    """list of int sequences -> (int64 [M, T] padded with 0, int64 [M] lengths)."""
    lengths = np.asarray([len(sequence) for sequence in sequences], dtype=np.int64)
    width = int(lengths.max()) if len(lengths) else 0
    padded = np.zeros((len(sequences), width), dtype=np.int64)
    for index, sequence in enumerate(sequences):
        padded[index, :len(sequence)] = sequence
    return padded, lengths


class CiderD:
    """CIDEr-D of token-id captions against fixed per-image references.

    Example (ids of a toy vocabulary; 2 = `<end>`):

        scorer = CiderD(references=[[[4, 5, 2], [4, 6, 2]], [[7, 8, 2]]], vocabulary_size=9)
        scorer.scores(np.array([[4, 5, 2], [7, 8, 2]]), np.array([3, 3]), np.array([0, 1]))
    """

    def __init__(self, references, vocabulary_size, document_frequency_references=None,
                 order=NGRAM_ORDER, sigma=SIGMA):
        """
        Args:
            references: list over images of list of int sequences (token ids, `<end>`
                included when it is to count), the captions a candidate of image i is scored
                against. Every image needs at least one reference.
            vocabulary_size: int, every id is in [0, vocabulary_size).
            document_frequency_references: list over images of lists of int sequences, the
                corpus of document frequencies and of N; defaults to `references`.
            order: int, largest n-gram (4 for CIDEr-D).
            sigma: float, the length penalty's standard deviation (6 for CIDEr-D).
        """
        if vocabulary_size >= MAX_VOCABULARY:
            raise ValueError(f"vocabulary_size must be below {MAX_VOCABULARY}, got {vocabulary_size}")
        if any(len(captions) == 0 for captions in references):
            raise ValueError("every image needs at least one reference caption")
        self.order = int(order)
        self.sigma = float(sigma)
        self.base = int(vocabulary_size) + 1
        corpus = references if document_frequency_references is None else document_frequency_references
        self.corpus_size = len(corpus)
        self.log_corpus_size = np.log(float(self.corpus_size))

        # Document frequency: in how many images' reference sets an n-gram occurs.
        corpus_rows, corpus_keys, _ = self._flatten(corpus)
        self.df_keys, dense = np.unique(corpus_keys, return_inverse=True)
        # One count per (image, n-gram): unique pairs, packed into one int64 each.
        pairs = np.unique(corpus_rows * max(len(self.df_keys), 1) + dense.reshape(-1))
        self.df_counts = np.bincount(pairs % max(len(self.df_keys), 1), minlength=len(self.df_keys))

        # Per reference caption: its unique n-grams and tf-idf weights, norms, length.
        sequences = [sequence for captions in references for sequence in captions]
        self.num_references = np.asarray([len(captions) for captions in references], dtype=np.int64)
        self.reference_offsets = np.concatenate([[0], np.cumsum(self.num_references)[:-1]]).astype(np.int64)
        self.max_references = int(self.num_references.max()) if len(references) else 0
        padded, lengths = _pad_sequences(sequences)
        ref_rows, ref_keys, ref_orders, ref_counts = _count_ngrams(*_ngram_keys(padded, lengths, self.order, self.base))
        ref_weights = ref_counts * self._idf(ref_keys)
        self.reference_norms = self._norms(ref_rows, ref_orders, ref_weights, len(sequences))
        self.reference_lengths = np.maximum(lengths - 1, 0).astype(np.float64)
        # Candidates find their matches by searching (image, n-gram) in one sorted table.
        image_of_reference = np.repeat(np.arange(len(references), dtype=np.int64), self.num_references)
        self.ngram_keys, dense = np.unique(ref_keys, return_inverse=True)
        table = image_of_reference[ref_rows] * len(self.ngram_keys) + dense
        sort = np.argsort(table, kind="stable")
        self.table = table[sort]
        self.table_reference = ref_rows[sort]
        self.table_weight = ref_weights[sort]

    def _flatten(self, captions_per_image):
        """(image rows, n-gram keys, orders) of every n-gram of every caption of every image."""
        sequences = [sequence for captions in captions_per_image for sequence in captions]
        image = np.repeat(np.arange(len(captions_per_image)), [len(captions) for captions in captions_per_image])
        padded, lengths = _pad_sequences(sequences)
        rows, keys, orders = _ngram_keys(padded, lengths, self.order, self.base)
        return image[rows] if len(rows) else rows, keys, orders

    def _idf(self, keys):
        """float64 [G]: log N - log max(1, df) of each n-gram key (df 0 for unseen n-grams)."""
        position = np.searchsorted(self.df_keys, keys)
        position = np.minimum(position, max(len(self.df_keys) - 1, 0))
        found = (self.df_keys[position] == keys) if len(self.df_keys) else np.zeros(len(keys), bool)
        df = np.where(found, self.df_counts[position] if len(self.df_keys) else 0, 0)
        return self.log_corpus_size - np.log(np.maximum(1.0, df))

    def _norms(self, rows, orders, weights, count):
        """float64 [count, order]: the Euclidean norm of each caption's weights per n."""
        squares = np.bincount(rows * self.order + (orders - 1), weights=weights ** 2, minlength=count * self.order)
        return np.sqrt(squares).reshape(count, self.order)

    def scores(self, token_ids, lengths, image_indices):
        """CIDEr-D of each candidate against the references of its image.

        Args:
            token_ids: int [M, T] candidate token ids, anything past `lengths` ignored.
            lengths: int [M], tokens per candidate (`<end>` included when it is to count).
            image_indices: int [M], which image's references (index into `references`).
        Returns:
            np.ndarray float64 [M].
        """
        token_ids = np.asarray(token_ids)
        lengths = np.asarray(lengths, dtype=np.int64)
        image_indices = np.asarray(image_indices, dtype=np.int64)
        count = len(lengths)
        rows, keys, orders, counts = _count_ngrams(*_ngram_keys(token_ids, lengths, self.order, self.base))
        weights = counts * self._idf(keys)
        candidate_norms = self._norms(rows, orders, weights, count)

        # Each candidate n-gram meets every reference of its image holding the same n-gram.
        dense = np.searchsorted(self.ngram_keys, keys)
        dense = np.minimum(dense, max(len(self.ngram_keys) - 1, 0))
        known = self.ngram_keys[dense] == keys if len(self.ngram_keys) else np.zeros(len(keys), bool)
        rows, orders, weights, dense = rows[known], orders[known], weights[known], dense[known]
        lookup = image_indices[rows] * len(self.ngram_keys) + dense
        first = np.searchsorted(self.table, lookup, side="left")
        matches = np.searchsorted(self.table, lookup, side="right") - first
        total = int(matches.sum())
        starts = np.repeat(first, matches)
        within = np.arange(total) - np.repeat(np.cumsum(matches) - matches, matches)
        entries = starts + within
        reference = self.table_reference[entries]
        reference_weight = self.table_weight[entries]
        candidate_weight = np.repeat(weights, matches)
        candidate_row = np.repeat(rows, matches)
        match_order = np.repeat(orders, matches)
        slot = reference - self.reference_offsets[image_indices[candidate_row]]
        flat = (candidate_row * self.max_references + slot) * self.order + (match_order - 1)
        clipped = np.minimum(candidate_weight, reference_weight) * reference_weight
        dots = np.bincount(flat, weights=clipped, minlength=count * self.max_references * self.order)
        dots = dots.reshape(count, self.max_references, self.order)

        # Per candidate and reference slot: norms, lengths, a mask for the padding slots.
        slots = np.arange(self.max_references)
        present = slots[np.newaxis, :] < self.num_references[image_indices][:, np.newaxis]
        reference_index = np.where(present, self.reference_offsets[image_indices][:, np.newaxis] + slots, 0)
        reference_norms = self.reference_norms[reference_index]  # [M, R, order]
        product = candidate_norms[:, np.newaxis, :] * reference_norms
        similarity = np.where(product != 0, dots / np.where(product != 0, product, 1.0), dots)
        candidate_length = np.maximum(lengths - 1, 0).astype(np.float64)
        delta = candidate_length[:, np.newaxis] - self.reference_lengths[reference_index]
        similarity = similarity * np.exp(-(delta ** 2) / (2 * self.sigma ** 2))[:, :, np.newaxis]
        similarity = np.where(present[:, :, np.newaxis], similarity, 0.0)
        per_order = similarity.sum(axis=1) / self.num_references[image_indices][:, np.newaxis]
        return 10.0 * per_order.mean(axis=1)
