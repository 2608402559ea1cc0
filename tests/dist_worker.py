"""The work that tests/test_distributed.py runs in one process and in two gloo ranks."""
import torch


def compute() -> dict:
    """KNN-Shapley, TMC-Shapley, influence scores, GraNd, a DM step and a DC step on small fixed problems."""
    from fastdd.data import load_digits
    from fastdd.distill import DistributionMatching, GradientMatching
    from fastdd.pruning import grand_scores
    from fastdd.train import train_model
    from fastdd.valuation import InfluenceFunction, KNNUtility, knn_shapley, tmc_shapley

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    X, y = torch.randn(90, 5, generator=gen), torch.randint(0, 3, (90,), generator=gen)
    Xt, yt = torch.randn(13, 5, generator=gen), torch.randint(0, 3, (13,), generator=gen)
    out = {}
    out["knn"], out["knn_per_test"] = knn_shapley(X, y, Xt, yt, k=3, return_per_test=True)
    # 5 permutations: an odd count, so the last round of two ranks has one idle rank
    res = tmc_shapley(KNNUtility(X[:12], y[:12], Xt, yt, k=3), 12, max_permutations=5, min_permutations=5,
                      convergence_tol=0.0, seed=3)
    out["tmc"], out["tmc_done"] = res.values, torch.tensor(res.n_samples)
    model = torch.nn.Linear(5, 3)
    train_model(model, X, y, epochs=20, lr=0.1, seed=0)
    inf = InfluenceFunction(model, damping=1e-2, solver="direct", batch_size=16).fit(X, y)
    out["influence"] = inf.scores(Xt, yt)
    out["self_influence"] = inf.self_influence()
    d = load_digits()
    # GraNd over 3 batches: two ranks take 2 and 1
    out["grand"] = grand_scores(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)), d.X_train[:70],
                                d.y_train[:70], batch_size=25)
    Xd, yd = d.X_train[:300], d.y_train[:300]
    dm = DistributionMatching(Xd, yd, ipc=2, model_options=dict(width=8, depth=2), batch_real=16, seed=0)
    for _ in range(2):
        dm.step()
    out["dm"] = dm.images.detach().clone()
    dc = GradientMatching(Xd, yd, ipc=1, model_options=dict(width=8, depth=2), batch_real=16, seed=0)
    dc.step()
    out["dc"] = dc.images.detach().clone()
    return out


def run(rank: int, world_size: int, init_file: str, out_prefix: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        from fastdd.distributed import shard, world

        out = compute()
        out["world"], out["shard_of_13"] = world(), shard(13)  # proof that the work was split
        torch.save(out, f"{out_prefix}{rank}.pt")
    finally:
        dist.destroy_process_group()
