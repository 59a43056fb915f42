-- expect: script_error
x = 1
