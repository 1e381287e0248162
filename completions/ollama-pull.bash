_ollama_pull_completion() {
    local IFS=$'
'
    COMPREPLY=( $( env COMP_WORDS="${COMP_WORDS[*]}" \
                   COMP_CWORD=$COMP_CWORD \
                   _OLLAMA_PULL_COMPLETE=complete_bash $1 ) )
    return 0
}

complete -o default -F _ollama_pull_completion ollama-pull
