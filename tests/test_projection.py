"""Random projections: JL scaling (F21), precision (F22), and the hook path's algebra."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from graddyn.capture.projection import (
    DenseProjector,
    KroneckerProjector,
    ProjectionSpec,
    gaussian_matrix,
    stable_seed,
)
from graddyn.data.collate import TokenizedSequence, collate_sequences
from graddyn.logprobs import gather_token_logprobs
from graddyn.store.shard import ShardRecord, list_shards, write_shard

CPU = torch.device("cpu")


def correlated_vectors(dim: int, n_pairs: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`n_pairs` pairs (x, y) in R^dim with cosine about 0.7 (at least 0.5)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n_pairs, dim, generator=generator, dtype=torch.float64)
    noise = torch.randn(n_pairs, dim, generator=generator, dtype=torch.float64)
    scales = torch.linspace(0.5, 3.0, n_pairs, dtype=torch.float64).unsqueeze(1)
    return x * scales, (x + noise) * scales * 2


def test_f21_projection_scaling():
    x, y = correlated_vectors(20000, 50, seed=0)
    cosine = torch.nn.functional.cosine_similarity(x, y, dim=1)
    assert cosine.min() >= 0.5
    spec = ProjectionSpec(kind="dense", seed=11, k_out=1024)
    assert "1/sqrt(k)" in spec.to_dict()["scaling"]
    projector = DenseProjector(spec, 20000)
    vectors = torch.cat([x, y])
    projected = projector.project(vectors).double()
    assert projected.shape == (100, 1024)

    norm_ratio = projected.square().sum(1) / vectors.square().sum(1)
    assert abs(norm_ratio.mean().item() - 1) <= 0.05
    px, py = projected[:50], projected[50:]
    dot_ratio = (px * py).sum(1) / (x * y).sum(1)
    assert abs(dot_ratio.mean().item() - 1) <= 0.1
    projected_cosine = torch.nn.functional.cosine_similarity(px, py, dim=1)
    assert (projected_cosine - cosine).abs().max() <= 0.1

    generator = torch.Generator().manual_seed(1)
    ratios = []
    spec = ProjectionSpec(seed=3, k_in=64, k_out=64)
    projector = KroneckerProjector(spec)
    for trial in range(50):
        gradient = torch.randn(96, 80, generator=generator, dtype=torch.float64)
        projected = projector.project_dense_weight(f"layer{trial}", gradient).double()
        assert projected.shape == (64, 64)
        ratios.append(projected.square().sum().item() / gradient.square().sum().item())
    assert abs(np.mean(ratios) - 1) <= 0.1


def test_kronecker_hook_path_equals_explicit_gradient():
    """Projecting inputs and output gradients apart equals projecting Σ_t g_t x_tᵀ."""
    generator = torch.Generator().manual_seed(2)
    inputs = torch.randn(3, 5, 24, generator=generator, dtype=torch.float64)
    output_grads = torch.randn(3, 5, 40, generator=generator, dtype=torch.float64)
    projector = KroneckerProjector(ProjectionSpec(seed=4, k_in=8, k_out=6))
    weight, bias = projector.project_weight_gradient("block.mlp", inputs, output_grads)
    assert weight.shape == (3, 6, 8) and bias.shape == (3, 6)
    assert weight.dtype == bias.dtype == torch.float32
    p_out = projector.factor("block.mlp", "out", 40, CPU)
    for b in range(3):
        explicit = output_grads[b].T @ inputs[b]
        expected = projector.project_dense_weight("block.mlp", explicit)
        assert torch.allclose(weight[b], expected, rtol=1e-5, atol=1e-5 * expected.abs().max())
        expected_bias = p_out.double() @ output_grads[b].sum(0)
        assert torch.allclose(bias[b].double(), expected_bias, rtol=1e-5, atol=1e-5)


def test_seeds_and_factors_are_reproducible():
    assert stable_seed(1, "layer", "in") == stable_seed(1, "layer", "in")
    assert stable_seed(1, "layer", "in") != stable_seed(2, "layer", "in")
    assert stable_seed(1, "layer", "in") != stable_seed(1, "layer", "out")
    assert 0 <= stable_seed("x") < 2**63
    matrix = gaussian_matrix(64, 500, seed=9)
    assert matrix.dtype == torch.float32 and torch.equal(matrix, gaussian_matrix(64, 500, 9))
    assert abs(matrix.square().sum(0).mean().item() - 1) < 0.1, "columns have E‖·‖² = 1"

    projector = KroneckerProjector(ProjectionSpec(seed=5, k_in=4, k_out=6))
    p_in = projector.factor("a", "in", 10, CPU)
    assert p_in.shape == (4, 10) and projector.factor("a", "out", 10, CPU).shape == (6, 10)
    assert not torch.equal(p_in, projector.factor("b", "in", 10, CPU))
    assert torch.equal(p_in, KroneckerProjector(projector.spec).factor("a", "in", 10, CPU))


def test_projector_arguments_are_checked():
    with pytest.raises(ValueError, match="kronecker"):
        KroneckerProjector(ProjectionSpec(kind="dense"))
    with pytest.raises(ValueError, match="dense"):
        DenseProjector(ProjectionSpec(kind="kronecker"), 10)
    projector = DenseProjector(ProjectionSpec(kind="dense", k_out=8), 10)
    with pytest.raises(ValueError, match="10"):
        projector.project(torch.zeros(2, 11))


def test_dense_projection_is_linear():
    generator = torch.Generator().manual_seed(0)
    vectors = torch.randn(4, 300, generator=generator)
    projector = DenseProjector(ProjectionSpec(kind="dense", seed=2, k_out=40), 300)
    projected = projector.project(vectors)
    summed = projector.project(vectors[:2] + vectors[2:])
    assert torch.allclose(summed, projected[:2] + projected[2:], rtol=1e-5, atol=1e-5)
    assert torch.allclose(projector.project(3 * vectors), 3 * projected, rtol=1e-5, atol=1e-5)
    assert torch.allclose(projector.project(vectors[1]), projected[1], rtol=1e-6, atol=1e-6)
    batched = projector.project(vectors.reshape(2, 2, 300))
    assert batched.shape == (2, 2, 40)


def test_dense_projection_depends_only_on_its_spec():
    """The spec stored in shards regenerates the matrix; `block_rows` only bounds memory."""
    vectors = torch.randn(3, 300, generator=torch.Generator().manual_seed(0))
    spec = ProjectionSpec(kind="dense", seed=2, k_out=40)
    default = DenseProjector(spec, 300).project(vectors)
    for block_rows in (16, 40):
        other = DenseProjector(spec, 300, block_rows=block_rows).project(vectors)
        assert torch.allclose(other, default, rtol=1e-5, atol=1e-5), f"block_rows={block_rows}"


def _dense_matrix(spec: ProjectionSpec, dim: int, block_rows: int) -> torch.Tensor:
    """The matrix of a DenseProjector, rebuilt row by row from the seeding it documents."""
    rows = [gaussian_matrix(1, dim, stable_seed(spec.seed, "dense", r)) for r in range(spec.k_out)]
    return torch.cat(rows) / math.sqrt(spec.k_out)


def test_f22_half_precision_accumulates_in_fp32(tmp_path):
    dim, k = 200_000, 256
    generator = torch.Generator().manual_seed(0)
    gradient = (300 * torch.randn(dim, generator=generator)).half()
    assert torch.isfinite(gradient).all()
    spec = ProjectionSpec(kind="dense", seed=0, k_out=k)
    projector = DenseProjector(spec, dim, block_rows=k)
    projected = projector.project(gradient.unsqueeze(0))[0]
    assert projected.dtype == torch.float32 and torch.isfinite(projected).all()
    matrix = _dense_matrix(spec, dim, k)
    probe = torch.randn(2, dim, generator=generator)
    assert torch.allclose(probe @ matrix.T, projector.project(probe), rtol=1e-4, atol=1e-3), (
        "_dense_matrix no longer rebuilds DenseProjector's matrix; update the helper"
    )
    reference = torch.zeros(k, dtype=torch.float64)
    for start in range(0, dim, 50_000):
        columns = slice(start, start + 50_000)
        reference += matrix[:, columns].double() @ gradient[columns].double()
    del matrix
    relative = (projected.double() - reference).norm() / reference.norm()
    assert relative <= 1e-2

    # Kronecker path: a per-sample gradient whose entries (~2e5) do not fit in fp16.
    inputs = (300 * torch.randn(1, 4, 500, generator=generator)).half()
    output_grads = (300 * torch.randn(1, 4, 400, generator=generator)).half()
    explicit = output_grads[0].double().T @ inputs[0].double()
    assert explicit.abs().max() > torch.finfo(torch.float16).max
    kronecker = KroneckerProjector(ProjectionSpec(seed=1, k_in=16, k_out=16))
    weight, bias = kronecker.project_weight_gradient("mlp", inputs, output_grads)
    assert weight.dtype == torch.float32 and torch.isfinite(weight).all()
    p_in = kronecker.factor("mlp", "in", 500, CPU).double()
    p_out = kronecker.factor("mlp", "out", 400, CPU).double()
    expected = p_out @ explicit @ p_in.T
    assert ((weight[0].double() - expected).norm() / expected.norm()).item() <= 1e-2
    assert expected.abs().max() > torch.finfo(torch.float16).max

    # Mixed precisions: fp16 inputs with fp32 output gradients, fp16 logits.
    mixed, _ = kronecker.project_weight_gradient("mlp", inputs, output_grads.float())
    assert torch.allclose(mixed, weight, rtol=1e-5, atol=1e-5 * weight.abs().max())
    batch = collate_sequences([TokenizedSequence([1, 2], [3, 4])], pad_id=0)
    logits = torch.randn(1, 4, 10, generator=generator).half()
    token_logp = gather_token_logprobs(logits, batch)
    assert token_logp.dtype == torch.float32 and torch.isfinite(token_logp).all()

    with np.errstate(over="ignore"):
        overflowed = np.array([70000.0], dtype=np.float32).astype(np.float16)
    for bad in (
        np.array([1.0, np.inf], dtype=np.float16),
        overflowed,
        np.array([0.0, np.nan], dtype=np.float32),
    ):
        path = tmp_path / "shards" / "step_00000000.h5"
        with pytest.raises(ValueError, match="non-finite"):
            write_shard(path, ShardRecord(step=0, arrays={"grads/per_sequence": bad}))
        assert not path.exists() and list_shards(tmp_path / "shards") == []
