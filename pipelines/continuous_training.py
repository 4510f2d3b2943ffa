"""The continuous-training DAG (see README: architecture).

check_prerequisites -> ingest -> validate_data -(gate)-> sft -> dpo -> evaluate -(gate)->
register -> deploy_canary -> analyze_canary -> promote | rollback

The same pipeline runs on Kubeflow Pipelines (compiled YAML next to this file) and on one
machine with kfp.local (`tuneloop run`). The run config travels as one `config` parameter
and is validated again by every task.
"""

from kfp import dsl

from tuneloop import components as c

PIPELINE_NAME = "tuneloop-continuous-training"


@dsl.pipeline(name=PIPELINE_NAME,
              description="Ingest, validate, SFT + DPO (DeepSpeed ZeRO-3), gated evaluation against the champion, "
                          "MLflow registry, canary rollout with automatic promotion or rollback.")
def continuous_training(config: dict, run_name: str = "tuneloop"):
    pre = c.check_prerequisites(config=config, run_name=run_name, kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER)
    pre.set_caching_options(False)
    parent = pre.outputs["parent_run_id"]

    data = c.ingest(config=config, parent_run_id=parent)
    data.set_caching_options(False)  # reads the feedback store, which changes between runs
    check = c.validate_data(config=config, parent_run_id=parent, dataset=data.outputs["dataset"])

    with dsl.If(check.outputs["passed"] == True, name="data-gate"):  # noqa: E712 - KFP condition syntax
        sft = c.sft(config=config, parent_run_id=parent, dataset=data.outputs["dataset"])
        dpo = c.dpo(config=config, parent_run_id=parent, dataset=data.outputs["dataset"],
                    sft_adapter=sft.outputs["adapter"])
        ev = c.evaluate(config=config, parent_run_id=parent, dataset=data.outputs["dataset"],
                        adapter=dpo.outputs["adapter"])
        ev.set_caching_options(False)  # compares against whatever is champion now

        with dsl.If(ev.outputs["passed"] == True, name="evaluation-gate"):  # noqa: E712
            reg = c.register(config=config, parent_run_id=parent, adapter=dpo.outputs["adapter"],
                             evaluation=ev.outputs["evaluation"], dataset=data.outputs["dataset"])
            dep = c.deploy_canary(config=config, parent_run_id=parent, version=reg.outputs["Output"])
            ana = c.analyze_canary(config=config, parent_run_id=parent, version=reg.outputs["Output"],
                                   deployed_at=dep.output)
            with dsl.If(ana.outputs["decision"] == "promote", name="canary-healthy"):
                c.promote(config=config, parent_run_id=parent, version=reg.outputs["Output"])
            with dsl.Else(name="canary-unhealthy"):
                c.rollback(config=config, parent_run_id=parent, version=reg.outputs["Output"])
            for t in (reg, dep, ana):
                t.set_caching_options(False)
        with dsl.Else(name="evaluation-rejected"):
            c.stop(config=config, parent_run_id=parent, reason="rejected by the evaluation gate")

    with dsl.Else(name="data-rejected"):
        c.stop(config=config, parent_run_id=parent, reason="stopped: data validation failed")
