"""Pure torch building blocks; nothing here imports fairseq."""
