"""Model families of the runtime: each folder holds a family's task API and input processing."""
