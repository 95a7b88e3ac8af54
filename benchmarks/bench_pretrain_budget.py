"""How far the mini CLIP's pretraining budget carries: pretrain with a given number of epochs,
identities and temperature, fine-tune IRRA-style on the CUHK-PEDES-style world, print validation and
test R1. Meant for a GPU (each configuration is one process; several can share one card), where it
maps in minutes what the 2-core CPU budget can reach.

    python benchmarks/bench_pretrain_budget.py EPOCHS N_IDS TEMPERATURE|learn FT_EPOCHS [gpus] [lr=.. batch_size=..]
"""
import json
import sys
import time

from person_retrieval.config import cache_dir
from person_retrieval.models import evaluate_retrieval, split_data
from person_retrieval.papers.tpr import fit_baseline
from person_retrieval.train import TaskSpec, TrainConfig, fit
from person_retrieval.world import world_dataset


def bbm_frozen() -> bool:
    from person_retrieval.models import MINI_CONFIGS

    return MINI_CONFIGS["small"].freeze_token_embedding


def main(epochs: int, n_ids: int, temperature: str, ft_epochs: int, gpus: int = 1, **train) -> None:
    from safetensors.torch import save_model

    t0 = time.time()
    temp = None if temperature == "learn" else float(temperature)
    if "freeze" in train:  # the mini CLIP's token table: frozen (default) or trained
        import dataclasses

        from person_retrieval.models import backbone as bbm

        bbm.MINI_CONFIGS["small"] = dataclasses.replace(bbm.MINI_CONFIGS["small"], freeze_token_embedding=bool(train.pop("freeze")))
    train = {"batch_size": 64, "lr": 1e-3, **train}
    tag = f"probe-f{int(bbm_frozen())}-e{epochs}-n{n_ids}-t{temperature}-ft{ft_epochs}-" + "-".join(f"{k}{v}" for k, v in sorted(train.items()))
    out = cache_dir() / "models" / tag
    spec = TaskSpec("person_retrieval.models.pretrain:ClipPretrainTask", {"scale": "small", "seed": 0, "n_ids": n_ids, "temperature": temp})
    res = fit(spec, TrainConfig(epochs=epochs, warmup_epochs=0.3 * max(1, epochs // 4), gpus=gpus, out_dir=str(out),
                                progress=False, **train))
    init = out / "backbone.safetensors"
    save_model(res.model.backbone, str(init))
    t1 = time.time()
    root = world_dataset("cuhk_pedes", "small", 0, progress=False)
    ft = fit_baseline("irra", "cuhk_pedes", root, "small", 0, gpus=gpus, init=str(init), progress=False, epochs=ft_epochs)
    test = evaluate_retrieval(ft.model, split_data("cuhk_pedes", root, "test", ft.model.backbone))
    print(json.dumps({"tag": tag, "ft_epochs": ft_epochs, "pretrain_val_R1": round(res.best["R1"], 1),
                      "train": train, "pretrain_pairs": res.history[-1]["step"] * train["batch_size"], "pretrain_s": round(t1 - t0),
                      "ft_val_R1": round(ft.best["R1"], 1), "test_R1": round(test["R1"], 1), "test_mAP": round(test["mAP"], 1),
                      "ft_s": round(time.time() - t1)}), flush=True)


if __name__ == "__main__":
    a = sys.argv[1:]
    kw = {k: (int(v) if v.isdigit() else float(v)) for k, v in (x.split("=") for x in a[5:])}
    main(int(a[0]), int(a[1]), a[2], int(a[3]), int(a[4]) if len(a) > 4 else 1, **kw)
