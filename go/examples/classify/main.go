// Command classify sends photos to the daemon's EfficientNet-Lite0 model and prints each
// photo's five most likely ImageNet classes, best first, one per line:
//
//	0.4082  tiger cat
//
// The files are sent as they are (JPEG, PNG, WebP, ...): the daemon decodes and resizes
// them, so this program needs no image code. The daemon must serve the example models:
//
//	.venv/bin/tensord serve --config daemon/tensord/examples/models.toml
//	go run ./examples/classify [-socket PATH] [-model NAME] photo.jpg [more.png ...]
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log"
	"os"
	"time"

	"github.com/tensord/tensord/go/shmclient"
)

func main() {
	socket := flag.String("socket", "", "daemon socket (default: $TENSORD_SOCKET, /run/tensord/tensord.sock or /tmp/tensord.sock)")
	model := flag.String("model", "efficientnet", "name of the classification model in the daemon's config")
	timeout := flag.Duration("timeout", time.Minute, "time limit for connecting and classifying")
	flag.Usage = func() {
		fmt.Fprintf(flag.CommandLine.Output(), "usage: classify [flags] photo [photo ...]\n")
		flag.PrintDefaults()
	}
	flag.Parse()
	log.SetFlags(0)
	if flag.NArg() == 0 {
		flag.Usage()
		os.Exit(2)
	}

	photos := make([][]byte, flag.NArg())
	total := 0
	for i, path := range flag.Args() {
		b, err := os.ReadFile(path)
		if err != nil {
			log.Fatalf("classify: %v", err)
		}
		photos[i] = b
		total += len(b)
	}

	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	opts := []shmclient.Option{shmclient.WithName("classify")}
	// One request carries every photo; the request ring (16 MiB by default) must hold it.
	if total > 8<<20 {
		opts = append(opts, shmclient.WithRingSize(2*total+1<<20, 0))
	}
	c, err := shmclient.Dial(ctx, *socket, opts...)
	if err != nil {
		log.Fatalf("classify: %v", err)
	}
	defer c.Close()

	out, err := c.Infer(ctx, *model, shmclient.FromBytes("image", nil, photos))
	if errors.Is(err, shmclient.ErrUnknownModel) {
		log.Fatalf("classify: %v\n(start the daemon with --config daemon/tensord/examples/models.toml)", err)
	}
	if errors.Is(err, shmclient.ErrBadInput) && len(photos) > 1 {
		// The daemon names the item by its index in the batch.
		for i, path := range flag.Args() {
			log.Printf("image %d: %s", i, path)
		}
	}
	if err != nil {
		log.Fatalf("classify: %v", err)
	}
	labels, err := output(out, "top_labels").Strings()
	if err != nil {
		log.Fatalf("classify: %v", err)
	}
	probs := output(out, "top_probs").Float32s()
	k := len(probs) / len(photos)
	for i, path := range flag.Args() {
		if len(photos) > 1 {
			if i > 0 {
				fmt.Println()
			}
			fmt.Printf("%s:\n", path)
		}
		for j := i * k; j < (i+1)*k; j++ {
			fmt.Printf("%.4f  %s\n", probs[j], labels[j])
		}
	}
}

// output returns the output called name, or exits naming what the model returned instead.
func output(out []shmclient.Tensor, name string) shmclient.Tensor {
	var names []string
	for _, t := range out {
		if t.Name == name {
			return t
		}
		names = append(names, t.Name)
	}
	log.Fatalf("classify: the model returned %v, not %q: is it the example EfficientNet?", names, name)
	return shmclient.Tensor{}
}
