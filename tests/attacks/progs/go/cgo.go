//go:build cgo

package main

// static int eg_cgo(void) { return 0; }
import "C"

// called, so the cgo variant really links and runs C code
func init() { C.eg_cgo() }
