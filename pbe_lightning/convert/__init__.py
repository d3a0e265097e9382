"""Key-layout conversion: our weights <-> the names other programs use, one module per layout.

``ldm``: diffusers UNet / VAE <-> LDM (CompVis) names; ``clip``: open_clip vision tower <->
transformers ``CLIPVisionModel``; ``official``: the official Paint-by-Example release's single
file <-> our module's state-dict names; ``pipeline``: diffusers ``PaintByExamplePipeline``
folders (building, saving, loading and reading one); ``keys``: prefix helpers. The rule that
keeps this layer import-circle free: ``pbe_lightning.convert.*`` takes the parts it needs (UNet
/ VAE and their configs, the open_clip tower, the ``ExemplarEncoder``) and never imports the
LightningModule (``models.module``), its builder (``models.build``) or an entry point
(``export``, ``train``, ``edit``, ``evaluate``); it may import ``models.encoder``,
``models.backbone`` and ``models.samplers``. Those who load or write weights (``models.init_from``,
``export``) import it, not the other way round.
"""
