"""MODEL plugins: entry points of group ``lorafx.plugins``.

A plugin is an object with ``load(arg: str, meta: bool = False) -> lora_fx.load.LoadedModel``;
the MODEL spec ``NAME:ARG`` calls the plugin registered as ``NAME`` with ``ARG``. Register one
in a package's ``pyproject.toml``::

    [project.entry-points."lorafx.plugins"]
    mine = "my_package.lorafx_plugin:plugin"

Built in: ``hf:DIR`` (:mod:`lora_fx.plugins.hf`), a Hugging Face model saved with
``save_pretrained``. ``meta=True`` must build the module on the meta device, without weights,
so that ``lorafx inject --dry-run`` plans a big model without loading it.
"""
