# airlock's bash driver: one persistent shell session. Each cell is sourced
# in this shell, so `cd`, variables, functions and options carry over.
#
# The guest agent starts this once, as the sandbox user, with the path of the
# cell file as $1 (written by the agent, read-only to us). fd 3 carries
# one-byte commands in ("r": run the cell, "z": reseed $RANDOM) and fd 4
# events out, one JSON object per line; user output goes to fds 1 and 2.
#
# Interrupting a cell (SIGINT to the process group) makes the trap below
# return from the sourced cell (the trap is set once: changing it per cell
# costs system calls; a cell that sets its own INT trap makes later
# timeouts restart the shell). `exit` ends the session, and the agent
# starts a new one.

exec 62>&4 63<&3 3<&- 4>&-
__airlock_cell=$1
shopt -s expand_aliases
__airlock_pending=0
__airlock_in_cell=0
__airlock_intr=0

__airlock_done() {
    __airlock_in_cell=0
    printf '{"ev":"done","status":%d}\n' "$1" >&62
    __airlock_pending=0
}
trap '__airlock_st=$?; ((__airlock_pending)) && printf "{\"ev\":\"done\",\"status\":%d,\"exited\":true}\n" "$__airlock_st" >&62' EXIT

# In a cell, SIGINT returns from it. One that lands after "r" was read but
# before the cell is sourced (a loaded machine) is remembered, and the cell
# is not started; outside a cell it is harmless, and forgotten before the
# next read.
trap '__airlock_intr=1; ((__airlock_in_cell)) && return 130 2>/dev/null' INT
printf '{"ev":"ready"}\n' >&62
# Two loops: a `break` in a cell leaves only the inner one.
while :; do
    while :; do
        # A `continue` in a cell lands here, before its "done".
        if ((__airlock_pending)); then __airlock_done 0; fi
        __airlock_intr=0
        IFS= read -r -n 1 -u 63 __airlock_op
        __airlock_rs=$?
        if ((__airlock_rs)); then
            # Interrupted by a late signal: read again. End of input: the
            # agent is gone.
            ((__airlock_rs > 128)) && continue
            exit 0
        fi
        case $__airlock_op in
            r)
                __airlock_pending=1
                __airlock_in_cell=1
                if ((__airlock_intr)); then
                    __airlock_done 130
                else
                    source "$__airlock_cell"
                    __airlock_done "$?"
                fi
                ;;
            z)
                RANDOM=$SRANDOM
                printf '{"ev":"ok"}\n' >&62
                ;;
        esac
    done
    if ((__airlock_pending)); then __airlock_done 0; fi
done
