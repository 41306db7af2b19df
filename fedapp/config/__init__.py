"""The run configuration: keys declared by the stages and modules that read them, validated once."""
