"""A synthetic multi-study drug-response cohort with known structure, for tests and demos.

Counts are gamma-Poisson (negative binomial) draws around a per-gene baseline, shifted per
study (batch effect), per sample (biological replicate noise) and, in a planted subset of
genes, per response class. Labels are assigned per sample, as in real cohorts.
"""

from __future__ import annotations

from collections.abc import Sequence

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

_CANCER_TYPES = {"lung": "LUAD", "breast": "BRCA", "skin": "SKCM", "colon": "COAD", "blood": "AML",
                 "prostate": "PRAD", "pancreas": "PAAD", "brain": "GBM"}
_DRUG_TYPES = {"erlotinib": "targeted", "gefitinib": "targeted", "osimertinib": "targeted", "vemurafenib": "targeted",
               "paclitaxel": "chemotherapy", "cisplatin": "chemotherapy", "docetaxel": "chemotherapy",
               "pembrolizumab": "immunotherapy", "nivolumab": "immunotherapy"}


def synthetic_cohort(
    *,
    n_studies: int = 4,
    samples_per_study: int = 6,
    cells_per_sample: int = 50,
    n_genes: int = 500,
    n_signal_genes: int = 25,
    signal: float = 1.0,
    batch_shift: float = 0.5,
    sample_sd: float = 0.2,
    sensitive_fraction: float = 0.5,
    mean_library_size: float = 3000.0,
    dispersion: float = 5.0,
    tissues: Sequence[str] = ("lung", "breast"),
    drugs: Sequence[str] = ("erlotinib", "paclitaxel"),
    regimens: Sequence[str] = ("monotherapy",),
    gene_names: Sequence[str] | None = None,
    seed: int = 0,
) -> ad.AnnData:
    """Simulate raw counts for ``n_studies`` x ``samples_per_study`` x ``cells_per_sample`` cells.

    Study ``i`` gets tissue ``tissues[i % len(tissues)]`` and drug
    ``drugs[(i // len(tissues)) % len(drugs)]``, so with the defaults every tissue and every
    drug spans two studies. Within a study, ``round(sensitive_fraction * samples_per_study)``
    samples (at least one of each class when there are two or more samples) are sensitive;
    every cell of a sample shares its label.

    ``signal`` is the log fold change (sensitive vs resistant, half the planted genes up, half
    down) of ``n_signal_genes`` genes; ``batch_shift`` the s.d. of per-study, per-gene log
    shifts; ``sample_sd`` the s.d. of per-sample log shifts. ``gene_names`` (default
    ``GENE0001``...) become ``var_names``.

    Returns an AnnData with float32 CSR integer counts; ``obs`` columns ``response``
    (``"sensitive"``/``"resistant"``), ``study``, ``sample``, ``tissue``, ``cancer_type``,
    ``drug``, ``drug_type``, ``regimen``; ``var["signal"]`` (the planted genes, +1 up, -1 down,
    0 none) and ``uns["synthetic"]`` (the parameters).
    """
    if min(n_studies, samples_per_study, cells_per_sample, n_genes) < 1:
        raise ValueError("n_studies, samples_per_study, cells_per_sample and n_genes must be >= 1")
    if not 0 <= n_signal_genes <= n_genes:
        raise ValueError(f"n_signal_genes must be between 0 and n_genes ({n_genes})")
    if not 0.0 <= sensitive_fraction <= 1.0:
        raise ValueError("sensitive_fraction must be between 0 and 1")
    if not tissues or not drugs or not regimens:
        raise ValueError("tissues, drugs and regimens must not be empty")
    if gene_names is None:
        genes = [f"GENE{i + 1:04d}" for i in range(n_genes)]
    else:
        genes = [str(g) for g in gene_names]
        if len(genes) != n_genes or len(set(genes)) != n_genes:
            raise ValueError(f"gene_names must hold {n_genes} unique names (got {len(genes)}, {len(set(genes))} unique)")

    rng = np.random.default_rng(seed)
    base = rng.normal(0.0, 1.5, n_genes)  # per-gene log abundance
    direction = np.zeros(n_genes, dtype=np.int8)
    planted = rng.choice(n_genes, n_signal_genes, replace=False)
    direction[planted[: n_signal_genes // 2]] = 1
    direction[planted[n_signal_genes // 2:]] = -1

    n_sens = int(round(sensitive_fraction * samples_per_study))
    if samples_per_study >= 2 and 0.0 < sensitive_fraction < 1.0:
        n_sens = min(max(n_sens, 1), samples_per_study - 1)

    blocks, obs_parts = [], []
    for s in range(n_studies):
        study = f"study{s + 1}"
        tissue = tissues[s % len(tissues)]
        drug = drugs[(s // len(tissues)) % len(drugs)]
        study_shift = rng.normal(0.0, batch_shift, n_genes) if batch_shift > 0 else np.zeros(n_genes)
        sens = np.zeros(samples_per_study, dtype=bool)
        sens[rng.permutation(samples_per_study)[:n_sens]] = True
        for j in range(samples_per_study):
            sample = f"{study}_sample{j + 1}"
            logmu = base + study_shift + rng.normal(0.0, sample_sd, n_genes)
            logmu = logmu + (signal / 2.0) * direction * (1 if sens[j] else -1)
            prop = np.exp(logmu - logmu.max())
            prop /= prop.sum()
            lib = rng.lognormal(np.log(mean_library_size), 0.3, cells_per_sample)
            lam = lib[:, None] * prop[None, :]
            counts = rng.poisson(rng.gamma(dispersion, lam / dispersion)).astype(np.float32)
            empty = np.flatnonzero(counts.sum(axis=1) == 0)
            counts[empty, int(np.argmax(prop))] = 1.0  # no all-zero cell
            blocks.append(sp.csr_matrix(counts))
            obs_parts.append(pd.DataFrame({
                "response": "sensitive" if sens[j] else "resistant",
                "study": study,
                "sample": sample,
                "tissue": tissue,
                "cancer_type": _CANCER_TYPES.get(tissue, f"{tissue} cancer"),
                "drug": drug,
                "drug_type": _DRUG_TYPES.get(drug, "other"),
                "regimen": regimens[s % len(regimens)],
            }, index=[f"{sample}_cell{k + 1}" for k in range(cells_per_sample)]))

    obs = pd.concat(obs_parts)
    obs.index.name = None
    var = pd.DataFrame({"signal": direction}, index=pd.Index(genes))
    params = {"n_studies": n_studies, "samples_per_study": samples_per_study, "cells_per_sample": cells_per_sample,
              "n_genes": n_genes, "n_signal_genes": n_signal_genes, "signal": signal, "batch_shift": batch_shift,
              "sample_sd": sample_sd, "sensitive_fraction": sensitive_fraction, "seed": seed}
    X = sp.vstack(blocks, format="csr").astype(np.float32)
    return ad.AnnData(X=X, obs=obs, var=var, uns={"synthetic": params})
