"""Reports: distillation, federation and privacy, each as JSON, Markdown and PNG."""
