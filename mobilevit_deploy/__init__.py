"""mobilevit_deploy: efficient vision transformers from training-time form to a phone."""

__version__ = "0.1.0"
