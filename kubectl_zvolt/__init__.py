"""`kubectl zvolt`: branch, snapshot, restore and inspect zvolt volumes through Kubernetes."""
