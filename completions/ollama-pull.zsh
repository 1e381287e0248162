#compdef ollama-pull

_ollama_pull_completion() {
  eval $(env _TYPER_COMPLETE_ARGS="${words[1,$CURRENT]}" _OLLAMA_PULL_COMPLETE=complete_zsh ollama-pull)
}

compdef _ollama_pull_completion ollama-pull
