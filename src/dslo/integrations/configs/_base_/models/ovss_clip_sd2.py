# dslo's OVSS segmentor: CLIP ViT-B/16 patch logits (MaskCLIP-style), Stable Diffusion 2
# self-attention, maximum-velocity discrepancy maps, JBU to the original resolution.
# Weights from the Hugging Face cache (HF_HUB_OFFLINE=1 honoured) or weights_dir.
# Input: every image resized to 512 x 512 for CLIP, as in the paper (size=N would be a short
# side). device=None: built on the CPU, the Runner moves it to the GPU; 'cuda:1' to choose.
model = dict(
    type='OVSSSegmentor',
    adapter=dict(name='clip', model='ViT-B-16', pretrained='openai', size=(512, 512)),
    attention=dict(name='sd2'),
    refiner=dict(solver='velocity'),
    classes='voc21',
    weights_dir=None,
    cache=None,
    device=None,
    data_preprocessor=dict(
        type='SegDataPreProcessor', mean=[0.0, 0.0, 0.0], std=[255.0, 255.0, 255.0], bgr_to_rgb=True))
