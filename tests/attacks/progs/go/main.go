// The attacker's program in Go (unsigned): the marker proves it ran. Built static, as PIE
// and with cgo, so ld.so can start the dynamic ones as a program, and its build-info magic
// can be overwritten to make it look like "not Go".
package main

import "os"

func main() {
	_, _ = os.Stdout.Write([]byte("EG-PWNED go\n"))
}
