# Runtime for Runner.test of dslo models (training-free: no optimiser, no train loop).
default_scope = 'mmseg'
custom_imports = dict(imports=['dslo.integrations.mmseg'], allow_failed_imports=False)
env_cfg = dict(
    cudnn_benchmark=False,
    mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
    dist_cfg=dict(backend='nccl'))
default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=50, log_metric_by_epoch=False))
test_cfg = dict(type='TestLoop')
# no DistributedDataParallel under torchrun: testing a training-free model needs none
model_wrapper_cfg = dict(type='DsloUnwrapped')
log_level = 'INFO'
load_from = None
resume = False
