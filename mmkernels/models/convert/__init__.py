"""State-dict converters from Hugging Face / timm checkpoints to mmkernels models. Nothing here downloads: pass a
loaded model or a state dict."""
