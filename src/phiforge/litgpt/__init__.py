"""The LitGPT route: the same Phi-2 family trained by LitGPT (`litgpt pretrain`), on the same tokens as phiforge.

    convert.py     LitGPT checkpoints (lit_model.pth + model_config.yaml) <-> phiforge checkpoints, and the
                   LitGPT `Config` of a phiforge `Phi2Config`. Needs only torch and PyYAML.
    data.py        a prepared phiforge token dataset -> litdata chunks (train/, val/) for `litgpt.data.LitData`
    datamodule.py  `PhiforgeLitData`: LitData that can keep the order phiforge drew (imported by litgpt itself)
    pretrain.py    `phiforge litgpt pretrain`: runs `litgpt pretrain`, then writes phiforge's metrics.jsonl and a
                   phiforge checkpoint of the result

`phiforge study`, which compares this route with phiforge's own, is phiforge.study. Everything except convert.py
needs the optional extra: pip install 'phiforge[litgpt]' (docs/litgpt.md).
"""
