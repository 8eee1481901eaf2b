// Command hello is the first program to run against a tensord daemon: it lists the
// models, sends a small tensor through identity and a batch through mlp, and prints the
// results with their round-trip times.
//
//	go run ./examples/hello [-socket PATH]
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"time"

	"github.com/tensord/tensord/go/shmclient"
)

func main() {
	socket := flag.String("socket", "", "daemon socket (default: $TENSORD_SOCKET, /run/tensord/tensord.sock or /tmp/tensord.sock)")
	flag.Parse()
	log.SetFlags(0)

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	start := time.Now()
	c, err := shmclient.Dial(ctx, *socket, shmclient.WithName("hello"))
	if err != nil {
		log.Fatalf("hello: %v", err)
	}
	defer c.Close()
	reqRing, respRing := c.RingSizes()
	fmt.Printf("connected to %s in %v (session %s, rings %d/%d KiB)\n",
		c.Daemon(), time.Since(start).Round(time.Microsecond), c.Session(), reqRing>>10, respRing>>10)

	models, err := c.Models(ctx)
	if err != nil {
		log.Fatalf("hello: %v", err)
	}
	fmt.Println("models:")
	for _, m := range models {
		fmt.Printf("  %-10s v%d %s on %-6s inputs %s -> outputs %s\n", m.Name, m.Version, m.Kind, m.Device, specs(m.Inputs), specs(m.Outputs))
	}

	x := shmclient.FromFloat32("x", []int64{2, 3}, []float32{1, 2, 3, 4, 5, 6})
	t0 := time.Now()
	out, err := c.Infer(ctx, "identity", x)
	if err != nil {
		log.Fatalf("hello: identity: %v", err)
	}
	rtt := time.Since(t0)
	fmt.Printf("identity(%v) = %s %v %v  [%v]\n", x.Float32s(), out[0].Name, out[0].Shape, out[0].Float32s(), rtt.Round(time.Microsecond))

	// Three different rows, so the three answers differ too.
	batch := make([]float32, 3*16)
	for i := range batch {
		row, col := i/16, i%16
		batch[i] = float32((row+1)*(col-8)) / 16
	}
	t0 = time.Now()
	out, err = c.Infer(ctx, "mlp", shmclient.FromFloat32("x", []int64{3, 16}, batch))
	if err != nil {
		log.Fatalf("hello: mlp: %v", err)
	}
	rtt = time.Since(t0)
	y := out[0].Float32s()
	fmt.Printf("mlp(x f32[3,16]) = %s %v  [%v]\n", out[0].Name, out[0].Shape, rtt.Round(time.Microsecond))
	for i := 0; i < int(out[0].Shape[0]); i++ {
		fmt.Printf("  row %d: %v\n", i, y[i*4:(i+1)*4])
	}

	// A warm round trip is what a serving loop sees.
	const n = 200
	t0 = time.Now()
	for i := 0; i < n; i++ {
		if _, err := c.Infer(ctx, "identity", x); err != nil {
			log.Fatalf("hello: identity: %v", err)
		}
	}
	fmt.Printf("%d identity round trips: %v each on average\n", n, (time.Since(t0) / n).Round(time.Microsecond))
}

func specs(ts []shmclient.TensorSpec) string {
	s := ""
	for i, t := range ts {
		if i > 0 {
			s += ", "
		}
		s += t.String()
	}
	return s
}
